"""ChatGLM3's published layout: its ``config.json`` fields, its tensor names and shapes, and the
transformers ``GlmConfig`` that describes the same network.

ChatGLM3 (THUDM's ``modeling_chatglm.py``) is a pre-norm decoder: RMSNorm, multi-query attention with
``multi_query_group_num`` key/value groups of ``kv_channels`` each, one fused ``query_key_value`` linear with a
bias (rows: every query head, then every key group, then every value group), an output ``dense`` without bias,
and a SwiGLU MLP whose ``dense_h_to_4h`` holds the gate rows then the up rows. Its rotary embedding turns the
first half of each head (``kv_channels // 2`` dimensions) as adjacent pairs ``(x[2i], x[2i + 1])`` by
``position * (10000 * rope_ratio) ** (-2i / (kv_channels // 2))``; the other half passes unrotated. That is
exactly transformers' GLM attention with ``partial_rotary_factor = 0.5`` (it interleaves the rotated half) and
``rope_theta = 10000 * rope_ratio``; the tests prove it against a forward written from this description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import FailedPrecondition

ROPE_BASE = 10000.0  # ChatGLM3's RotaryEmbedding base, multiplied by rope_ratio (50 for ChatGLM3-6B-32k)
PARTIAL_ROTARY = 0.5  # ChatGLM3 rotates kv_channels // 2 dimensions of each head
LAYER = "transformer.encoder.layers.{i}."
# Config fields whose other values change the network beyond what GlmForCausalLM computes: (field, required
# value). apply_query_key_layer_scaling, attention_softmax_in_fp32 and fp32_residual_connection only change
# fp16 rounding, not the function, and are ignored.
FIXED_FIELDS = (("rmsnorm", True), ("add_bias_linear", False), ("apply_residual_connection_post_layernorm", False),
                ("post_layer_norm", True))
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>")  # in this order right after the SentencePiece vocabulary (SPTokenizer)
# Non-weight buffers some checkpoints carry; they are derived from the config and not copied.
IGNORED = ("transformer.rotary_pos_emb.inv_freq",)
PREFIX_ENCODER = "transformer.prefix_encoder."


@dataclass(frozen=True)
class ChatGLM3Config:
    """The fields of a ChatGLM3 ``config.json`` that shape the network (names as THUDM spells them)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    groups: int  # multi_query_group_num (num_attention_heads when multi_query_attention is off)
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int
    layernorm_epsilon: float
    add_qkv_bias: bool
    rope_ratio: float
    pre_seq_len: int | None
    prefix_projection: bool
    raw: dict[str, Any]

    @property
    def rope_theta(self) -> float:
        return ROPE_BASE * self.rope_ratio

    @property
    def rotary_dim(self) -> int:
        return self.kv_channels // 2

    @property
    def qkv_rows(self) -> tuple[int, int, int]:
        """Rows of the fused ``query_key_value`` weight for queries, keys and values."""
        return (self.num_attention_heads * self.kv_channels, self.groups * self.kv_channels,
                self.groups * self.kv_channels)

    @property
    def prefix_width(self) -> int:
        """Columns of the prefix encoder's table: every layer's key and value for every group."""
        return self.num_layers * 2 * self.kv_channels * self.groups


def _field(raw: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = raw.get(name, default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if not ok:
        wanted = {bool: "true or false", float: "a positive number", int: "a positive integer"}[kind]
        raise FailedPrecondition(f"config.json: {name} = {value!r} must be {wanted}")
    return value


def parse_config(raw: Any) -> ChatGLM3Config:
    """Check a ChatGLM3 ``config.json`` (a dict) and keep what shapes the network; FailedPrecondition naming
    the field otherwise."""
    if not isinstance(raw, dict):
        raise FailedPrecondition("config.json is not a JSON object")
    if raw.get("model_type") != "chatglm":
        raise FailedPrecondition(f"config.json: model_type {raw.get('model_type')!r} is not 'chatglm' "
                                 "(not a ChatGLM3 checkpoint)")
    for name, wanted in FIXED_FIELDS:
        if raw.get(name, wanted) != wanted:
            raise FailedPrecondition(f"config.json: {name} = {raw[name]!r} is not ChatGLM3's architecture "
                                     f"(expected {wanted!r})")
    heads = _field(raw, "num_attention_heads", int)
    mqa = _field(raw, "multi_query_attention", bool, False)
    groups = _field(raw, "multi_query_group_num", int) if mqa else heads
    if heads % groups:
        raise FailedPrecondition(f"config.json: num_attention_heads {heads} is not a multiple of "
                                 f"multi_query_group_num {groups}")
    kv_channels = _field(raw, "kv_channels", int)
    if kv_channels % 4:
        raise FailedPrecondition(f"config.json: kv_channels = {kv_channels} must be a multiple of 4 (half of "
                                 "each head turns in pairs)")
    pre_seq_len = raw.get("pre_seq_len")
    return ChatGLM3Config(
        num_layers=_field(raw, "num_layers", int), hidden_size=_field(raw, "hidden_size", int),
        num_attention_heads=heads, kv_channels=kv_channels, groups=groups,
        ffn_hidden_size=_field(raw, "ffn_hidden_size", int),
        padded_vocab_size=_field(raw, "padded_vocab_size", int), seq_length=_field(raw, "seq_length", int),
        layernorm_epsilon=_field(raw, "layernorm_epsilon", float, 1e-5),
        add_qkv_bias=_field(raw, "add_qkv_bias", bool, False), rope_ratio=_field(raw, "rope_ratio", float, 1),
        pre_seq_len=None if pre_seq_len is None else _field(raw, "pre_seq_len", int),
        prefix_projection=_field(raw, "prefix_projection", bool, False), raw=raw)


def base_tensors(cfg: ChatGLM3Config) -> dict[str, tuple[int, ...]]:
    """Every weight a ChatGLM3 base checkpoint must hold, with its shape."""
    h, qkv = cfg.hidden_size, sum(cfg.qkv_rows)
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (cfg.padded_vocab_size, h)}
    for i in range(cfg.num_layers):
        p = LAYER.format(i=i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = (qkv, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (qkv,)
        shapes[p + "self_attention.dense.weight"] = (h, cfg.num_attention_heads * cfg.kv_channels)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * cfg.ffn_hidden_size, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, cfg.ffn_hidden_size)
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (cfg.padded_vocab_size, h)
    return shapes


def prefix_tensors(cfg: ChatGLM3Config, pre_seq_len: int) -> dict[str, tuple[int, ...]]:
    """The prefix encoder's weights (P-Tuning v2), with the projection MLP when ``prefix_projection``."""
    width = cfg.prefix_width
    shapes: dict[str, tuple[int, ...]] = {PREFIX_ENCODER + "embedding.weight": (pre_seq_len, width)}
    if cfg.prefix_projection:
        h = cfg.hidden_size
        shapes.update({PREFIX_ENCODER + "trans.0.weight": (h, width), PREFIX_ENCODER + "trans.0.bias": (h,),
                       PREFIX_ENCODER + "trans.2.weight": (width, h), PREFIX_ENCODER + "trans.2.bias": (width,)})
    return shapes


def glm_config(cfg: ChatGLM3Config, special_ids: dict[str, int], eos_id: int, pad_id: int,
               dtype: str) -> dict[str, Any]:
    """The ``config.json`` of the same network as transformers' ``GlmForCausalLM`` (weights in ``dtype``).
    Generation stops at the end of text and at the next turn (``<|user|>``, ``<|observation|>``), as
    ChatGLM3's ``chat`` does."""
    return {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.groups,
        "head_dim": cfg.kv_channels, "hidden_act": "silu", "attention_bias": cfg.add_qkv_bias,
        "attention_dropout": 0.0, "max_position_embeddings": cfg.seq_length,
        "rms_norm_eps": cfg.layernorm_epsilon, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": PARTIAL_ROTARY},
        "pad_token_id": pad_id, "eos_token_id": [eos_id, special_ids["<|user|>"], special_ids["<|observation|>"]],
        "bos_token_id": None, "dtype": dtype,
    }
