"""A tiny ChatGLM3 checkpoint in THUDM's layout (names, shapes and config fields as published), its
SentencePiece tokenizer, finetune_demo-style adapters, and a reference forward written from the
architecture's description (not from transformers' GLM code): the oracle of the converter tests.

The reference, per layer: RMSNorm; one fused ``query_key_value`` linear with bias whose rows are every query
head, then every key/value group (multi-query attention, ``multi_query_group_num`` groups, head ``h`` reading
group ``h // (heads / groups)``); rotary position embedding on the first half of each head, adjacent pairs
``(x[2i], x[2i+1])`` turned by ``position * (10000 * rope_ratio) ** (-2i / (kv_channels / 2))``; a P-Tuning v2
prefix as extra keys and values in front of every layer's own (raw, never rotated), the prompt's positions
counted from 0; causal softmax attention scaled by ``1 / sqrt(kv_channels)``; ``dense``; RMSNorm; SwiGLU over
``dense_h_to_4h`` (``silu(first half) * second half``); ``dense_4h_to_h``; residuals around both blocks.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello adapters, hello daemon.",
    "A language model predicts the next token. Adapters are small; the base model is large.",
    "Prefix tuning prepends trained keys and values to every attention layer.",
    "你是谁？我是Gitclone，一个语言模型，由来自git-cloner的研究人员训练。",
    "今天天气很好。我们一起去公园散步吧。机器学习是人工智能的一个分支。",
    "What is the capital of France? Paris is the capital of France. 1234 5678",
]
SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
           "<|observation|>"]


def write_tokenizer_model(path: Path, vocab_size: int = 700) -> Path:
    """A SentencePiece BPE model with byte fallback and the identity normalizer, as ChatGLM3's."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


@dataclass
class Tiny:
    """A tiny ChatGLM3 config (field names as THUDM's config.json)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    kv_channels: int = 16
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 96
    padded_vocab_size: int = 0  # filled from the tokenizer, rounded up as ChatGLM3 pads its vocabulary
    seq_length: int = 256
    rope_ratio: float = 2.0
    layernorm_epsilon: float = 1e-5
    extra: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
                "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
                "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
                "attention_softmax_in_fp32": True, "ffn_hidden_size": self.ffn_hidden_size,
                "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": self.hidden_size,
                "kv_channels": self.kv_channels, "layernorm_epsilon": self.layernorm_epsilon,
                "multi_query_attention": True, "multi_query_group_num": self.multi_query_group_num,
                "num_attention_heads": self.num_attention_heads, "num_layers": self.num_layers,
                "original_rope": True, "padded_vocab_size": self.padded_vocab_size, "post_layer_norm": True,
                "rmsnorm": True, "seq_length": self.seq_length, "rope_ratio": self.rope_ratio,
                "use_cache": True, "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0,
                "tie_word_embeddings": False, **self.extra}


def random_weights(t: Tiny, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in THUDM's names, wide enough that greedy answers vary with the prompt and the adapter."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.1, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    h, d, g, n = t.hidden_size, t.kv_channels, t.multi_query_group_num, t.num_attention_heads
    w = {"transformer.embedding.word_embeddings.weight": rand(t.padded_vocab_size, h, std=0.3)}
    for i in range(t.num_layers):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = rand(h, mean=1.0)
        w[p + "self_attention.query_key_value.weight"] = rand((n + 2 * g) * d, h, std=0.15)
        w[p + "self_attention.query_key_value.bias"] = rand((n + 2 * g) * d, std=0.2)
        w[p + "self_attention.dense.weight"] = rand(h, n * d)
        w[p + "post_attention_layernorm.weight"] = rand(h, mean=1.0)
        w[p + "mlp.dense_h_to_4h.weight"] = rand(2 * t.ffn_hidden_size, h)
        w[p + "mlp.dense_4h_to_h.weight"] = rand(h, t.ffn_hidden_size)
    w["transformer.encoder.final_layernorm.weight"] = rand(h, mean=1.0)
    w["transformer.output_layer.weight"] = rand(t.padded_vocab_size, h, std=0.3)
    # a buffer the published checkpoints carry (without rope_ratio: ChatGLM3 scales the base in its forward)
    half = d // 2
    w["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half)
    return w


def write_checkpoint(out: Path, t: Tiny, weights: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    """config.json, tokenizer.model and the weights in two shards with an index, as THUDM publishes them."""
    out.mkdir(parents=True, exist_ok=True)
    spm_path = out / "tokenizer.model"
    if not spm_path.exists():
        write_tokenizer_model(spm_path)
    if not t.padded_vocab_size:
        import sentencepiece as spm

        words = spm.SentencePieceProcessor(model_file=str(spm_path)).vocab_size() + len(SPECIAL)
        t.padded_vocab_size = 64 * math.ceil(words / 64)
    (out / "config.json").write_text(json.dumps(t.config(), indent=2))
    names = list(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    stem, suffix = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        filename = f"{stem}-{k:05d}-of-00002{suffix}"
        part = {n: weights[n].contiguous() for n in shard}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(out / filename), metadata={"format": "pt"})
        else:
            torch.save(part, out / filename)
        weight_map.update({n: filename for n in shard})
    (out / f"{stem}{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def rope(x: torch.Tensor, positions: torch.Tensor, t: Tiny) -> torch.Tensor:
    """x: [seq, heads, d]; the first d/2 dimensions turned in adjacent pairs, the rest unchanged."""
    half = t.kv_channels // 2
    base = 10000.0 * t.rope_ratio
    theta = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    angle = positions.to(torch.float64)[:, None] * theta[None]  # [seq, half/2]
    cos, sin = angle.cos()[:, None].to(x.dtype), angle.sin()[:, None].to(x.dtype)
    out = x.clone()
    a, b = x[..., 0:half:2], x[..., 1:half:2]
    out[..., 0:half:2] = a * cos - b * sin
    out[..., 1:half:2] = b * cos + a * sin
    return out


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def reference_logits(w: dict[str, torch.Tensor], t: Tiny, ids: list[int], prefix: torch.Tensor | None = None,
                     qkv_delta: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [seq, vocab] for one sequence; ``prefix`` is the P-Tuning v2 table [P, L * 2 * groups * d];
    ``qkv_delta[layer]`` is added to that layer's query_key_value weight (a LoRA's ``scaling * B @ A``)."""
    d, g, n = t.kv_channels, t.multi_query_group_num, t.num_attention_heads
    x = w["transformer.embedding.word_embeddings.weight"][ids]
    seq = len(ids)
    positions = torch.arange(seq)
    past = 0 if prefix is None else prefix.shape[0]
    kv_prefix = None if prefix is None else prefix.reshape(past, t.num_layers, 2, g, d)
    for i in range(t.num_layers):
        p = f"transformer.encoder.layers.{i}."
        hidden = rms(x, w[p + "input_layernorm.weight"], t.layernorm_epsilon)
        weight = w[p + "self_attention.query_key_value.weight"]
        if qkv_delta and i in qkv_delta:
            weight = weight + qkv_delta[i]
        qkv = hidden @ weight.T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([n * d, g * d, g * d], dim=-1)
        q, k, v = rope(q.view(seq, n, d), positions, t), rope(k.view(seq, g, d), positions, t), v.view(seq, g, d)
        if kv_prefix is not None:
            k = torch.cat([kv_prefix[:, i, 0], k])
            v = torch.cat([kv_prefix[:, i, 1], v])
        k, v = k.repeat_interleave(n // g, dim=1), v.repeat_interleave(n // g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        visible = torch.ones(seq, past + seq, dtype=torch.bool).tril(diagonal=past)
        scores = scores.masked_fill(~visible, float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, n * d)
        x = x + attn @ w[p + "self_attention.dense.weight"].T
        hidden = rms(x, w[p + "post_attention_layernorm.weight"], t.layernorm_epsilon)
        gate, up = (hidden @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, w["transformer.encoder.final_layernorm.weight"], t.layernorm_epsilon)
    return x @ w["transformer.output_layer.weight"].T


def reference_greedy(w, t: Tiny, ids: list[int], new_tokens: int, stop: set[int], **adapter) -> list[int]:
    """Greedy tokens, one full forward per step (no cache), stopping before the first ``stop`` token."""
    out: list[int] = []
    for _ in range(new_tokens):
        nxt = int(reference_logits(w, t, ids + out, **adapter)[-1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return out


def write_prefix_checkpoint(out: Path, t: Tiny, table: torch.Tensor, base_weights: dict | None = None,
                            fmt: str = "bin") -> Path:
    """A finetune_demo P-Tuning v2 checkpoint: config.json with pre_seq_len and the prefix encoder's table,
    alone (prefix-only, as a .bin) or with ``base_weights`` (every base weight: a full checkpoint; the
    projection MLP's ``trans.*``: prefix_projection)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {**(base_weights or {}), "transformer.prefix_encoder.embedding.weight": table}
    projected = "transformer.prefix_encoder.trans.0.weight" in weights
    (out / "config.json").write_text(json.dumps({**t.config(), "pre_seq_len": table.shape[0],
                                                 "prefix_projection": projected}))
    if fmt == "bin":
        torch.save(weights, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def write_lora_checkpoint(out: Path, t: Tiny, r: int, alpha: int, seed: int) -> tuple[Path, dict[int, torch.Tensor]]:
    """A PEFT LoRA on ChatGLM3's fused query_key_value, as finetune_demo's PEFT saves it; returns the
    directory and each layer's ``scaling * B @ A`` for the reference."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows = (t.num_attention_heads + 2 * t.multi_query_group_num) * t.kv_channels
    tensors, deltas = {}, {}
    for i in range(t.num_layers):
        a = torch.randn(r, t.hidden_size, generator=gen) * 0.3
        b = torch.randn(rows, r, generator=gen) * 0.3
        key = f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        deltas[i] = (alpha / r) * (b @ a)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.1,
              "target_modules": ["query_key_value"], "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": "THUDM/chatglm3-6b", "modules_to_save": None,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out, deltas
