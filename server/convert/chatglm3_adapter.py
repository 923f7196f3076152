"""``adapterd convert chatglm3-adapter SRC DST --base CONVERTED``: ChatGLM3 ``finetune_demo`` adapters into
PEFT adapters for the base that ``adapterd convert chatglm3`` wrote.

- P-Tuning v2: ``finetune_demo`` trains the model's own prefix encoder (``config.pre_seq_len``); its table
  ``transformer.prefix_encoder.embedding.weight`` is ``[pre_seq_len, num_layers * 2 * groups * kv_channels]``,
  laid out as PEFT's ``prompt_embeddings`` (per virtual token: layer 0's key, its value, layer 1's key, ...),
  from a full checkpoint or a prefix-only one. With ``prefix_projection`` the MLP is applied once here: PEFT's
  table is its output. One difference: ChatGLM3 counts the prompt's positions from 0 behind the prefix, PEFT
  (and the engine) from ``pre_seq_len``. Each prefix key enters attention unrotated, so a query turned by
  ``R(p + v)`` against a key turned by ``R(v)`` scores as ChatGLM3's ``R(p)`` against the raw key: the keys'
  rotated half is turned once by position ``v = pre_seq_len`` here, which is exact (rotations compose).
- LoRA: PEFT LoRA on the fused ``query_key_value`` becomes LoRA on ``q_proj``, ``k_proj``, ``v_proj``: the same
  A for the three, B split by its output rows (``W + s B A`` split by rows is each projection's own update).
  ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` map to ``o_proj``, ``gate_up_proj``, ``down_proj`` as they are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.peft_format import LoraConfig as ServedLoraConfig
from ..errors import FailedPrecondition, NotFound
from ..merge.atomic import merge_output
from .chatglm3 import open_source
from .chatglm3_layout import PREFIX_ENCODER
from .checkpoint import SourceCheckpoint, read_config_json, weight_files

LORA_KEY = re.compile(r"^base_model\.model\.transformer\.encoder\.layers\.(\d+)\.(self_attention|mlp)\."
                      r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.lora_([AB])\.weight$")
RENAMED = {"dense": "o_proj", "dense_h_to_4h": "gate_up_proj", "dense_4h_to_h": "down_proj"}
# LoRA options that change what the adapter computes beyond W + s B A on the named linears.
LORA_REFUSED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "fan_in_fan_out")


@dataclass(frozen=True)
class GlmBase:
    """What the converted base's ``config.json`` says about its shapes."""

    num_layers: int
    hidden_size: int
    heads: int
    groups: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rotary_dim: int

    @classmethod
    def read(cls, base: Path) -> GlmBase:
        raw = read_config_json(base, "the directory `adapterd convert chatglm3` wrote", "--base: ")
        if not isinstance(raw, dict) or raw.get("model_type") != "glm":
            raise FailedPrecondition(f"--base: model_type {raw.get('model_type')!r} is not 'glm' (convert the "
                                     "ChatGLM3 base with `adapterd convert chatglm3` first)")
        try:
            rope = raw.get("rope_parameters") or {}
            head_dim = int(raw["head_dim"])
            partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
            return cls(int(raw["num_hidden_layers"]), int(raw["hidden_size"]), int(raw["num_attention_heads"]),
                       int(raw["num_key_value_heads"]), head_dim, int(raw["intermediate_size"]),
                       float(rope["rope_theta"]), int(head_dim * partial))
        except (KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"--base: config.json lacks a valid {exc}") from None


@dataclass(frozen=True)
class AdapterConvertResult:
    output: Path
    kind: str  # PREFIX_TUNING or LORA
    detail: str


def rotate_keys(table: torch.Tensor, base: GlmBase, position: int) -> torch.Tensor:
    """The prefix table with every layer's keys turned by rotary position ``position`` (GLM's layout: the first
    ``rotary_dim`` dimensions of each head, in adjacent pairs). Computed in fp64, returned in fp32."""
    v = table.shape[0]
    kv = table.to(torch.float64).reshape(v, base.num_layers, 2, base.groups, base.head_dim).clone()
    half = base.rotary_dim
    inv_freq = base.rope_theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    cos, sin = torch.cos(position * inv_freq), torch.sin(position * inv_freq)
    keys = kv[:, :, 0, :, :half]
    even, odd = keys[..., 0::2].clone(), keys[..., 1::2].clone()
    keys[..., 0::2] = even * cos - odd * sin
    keys[..., 1::2] = odd * cos + even * sin
    return kv.reshape(v, -1).to(torch.float32)


def source_prefix_config(src: Path) -> dict[str, Any]:
    """The P-Tuning v2 fields of SRC's config.json, when it has one (prefix-only checkpoints may not)."""
    path = src / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise FailedPrecondition("config.json is not valid JSON") from None
    return raw if isinstance(raw, dict) else {}


def prefix_table(source: SourceCheckpoint, base: GlmBase, config: dict[str, Any]) -> torch.Tensor:
    """ChatGLM3's prefix key/values ``[pre_seq_len, width]`` in fp32 (through the projection MLP if any),
    checked against SRC's config.json (``pre_seq_len``, ``prefix_projection``) when it says."""
    name = PREFIX_ENCODER + "embedding.weight"
    if name not in source.tensors:
        raise FailedPrecondition(f"tensor {name} is missing (not a P-Tuning v2 checkpoint; a LoRA checkpoint "
                                 "holds adapter_config.json)")
    projected = PREFIX_ENCODER + "trans.0.weight" in source.tensors
    if config.get("prefix_projection") and not projected:
        raise FailedPrecondition(f"tensor {PREFIX_ENCODER}trans.0.weight is missing (config.json: "
                                 "prefix_projection is true)")
    if config.get("pre_seq_len") not in (None, source.tensors[name].shape[0]):
        raise FailedPrecondition(f"tensor {name} has {source.tensors[name].shape[0]} rows; config.json: "
                                 f"pre_seq_len is {config['pre_seq_len']!r}")
    width = base.num_layers * 2 * base.groups * base.head_dim
    shape = source.tensors[name].shape
    if len(shape) != 2 or shape[0] < 1:
        raise FailedPrecondition(f"tensor {name} has shape {list(shape)}; [pre_seq_len, width] was expected")
    table = source.rows(name).to(torch.float32)
    if projected:
        table = _project(source, table, base, width)
    elif shape[1] != width:
        raise FailedPrecondition(f"tensor {name} has {shape[1]} columns; the base needs num_layers * 2 * groups * "
                                 f"kv_channels = {width} (made for another base?)")
    if not torch.isfinite(table).all():
        raise FailedPrecondition(f"tensor {name} holds non-finite values")
    return table


def _project(source: SourceCheckpoint, table: torch.Tensor, base: GlmBase, width: int) -> torch.Tensor:
    """``trans``: Linear(width, hidden), tanh, Linear(hidden, width), applied to the embedding table."""
    expected = {"trans.0.weight": (base.hidden_size, table.shape[1]), "trans.0.bias": (base.hidden_size,),
                "trans.2.weight": (width, base.hidden_size), "trans.2.bias": (width,)}
    parts = {}
    for short, shape in expected.items():
        name = PREFIX_ENCODER + short
        if name not in source.tensors or source.tensors[name].shape != shape:
            found = list(source.tensors[name].shape) if name in source.tensors else "missing"
            raise FailedPrecondition(f"tensor {name}: {found}; {list(shape)} was expected for this base")
        parts[short] = source.rows(name).to(torch.float32)
    hidden = torch.tanh(table @ parts["trans.0.weight"].T + parts["trans.0.bias"])
    return hidden @ parts["trans.2.weight"].T + parts["trans.2.bias"]


def write_prefix(tmp: Path, table: torch.Tensor, base: GlmBase, base_dir: Path) -> None:
    """PEFT's own config writer, with the fields PEFT derives for a GQA base (token_dim = groups * head_dim)."""
    from peft import PrefixTuningConfig
    from safetensors.torch import save_file

    token_dim = base.groups * base.head_dim
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=table.shape[0], prefix_projection=False,
                                num_layers=base.num_layers, token_dim=token_dim, num_attention_heads=base.groups,
                                encoder_hidden_size=token_dim, base_model_name_or_path=str(base_dir),
                                inference_mode=True)
    config.save_pretrained(str(tmp))
    save_file({"prompt_embeddings": table.contiguous()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def convert_prefix(src: Path, dst: Path, base_dir: Path, base: GlmBase, overwrite: bool) -> AdapterConvertResult:
    source = open_source(src)
    try:
        table = prefix_table(source, base, source_prefix_config(src))
    finally:
        source.close()
    virtual = table.shape[0]
    table = rotate_keys(table, base, virtual)
    with merge_output(dst, overwrite=overwrite, marker="adapter_config.json", field="DST") as tmp:
        write_prefix(tmp, table, base, base_dir)
    return AdapterConvertResult(dst, "PREFIX_TUNING", f"{virtual} virtual tokens")


def read_lora_config(src: Path) -> dict[str, Any]:
    try:
        raw = json.loads((src / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise FailedPrecondition("adapter_config.json is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise FailedPrecondition("adapter_config.json: peft_type must be LORA (P-Tuning v2 checkpoints hold the "
                                 "prefix encoder in their weights, not an adapter_config.json)")
    for name in LORA_REFUSED:
        if raw.get(name):
            raise FailedPrecondition(f"adapter_config.json: {name} = {raw[name]!r} is not supported")
    if raw.get("bias", "none") != "none":
        raise FailedPrecondition(f"adapter_config.json: bias = {raw['bias']!r}: only 'none' converts")
    return raw


def lora_tensors(source: SourceCheckpoint, base: GlmBase) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The renamed and split A/B tensors, and the new target module names."""
    q = base.heads * base.head_dim
    kv = base.groups * base.head_dim
    rows = {"query_key_value": q + 2 * kv, "dense": base.hidden_size, "dense_h_to_4h": 2 * base.intermediate_size,
            "dense_4h_to_h": base.hidden_size}
    cols = {"query_key_value": base.hidden_size, "dense": q, "dense_h_to_4h": base.hidden_size,
            "dense_4h_to_h": base.intermediate_size}
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name in source.tensors:
        match = LORA_KEY.match(name)
        if match is None:
            raise FailedPrecondition(f"tensor {name} is not a LoRA weight of ChatGLM3's linears")
        layer, block, module, ab = int(match[1]), match[2], match[3], match[4]
        if layer >= base.num_layers:
            raise FailedPrecondition(f"tensor {name}: the base has {base.num_layers} layers")
        value = source.rows(name)
        want = (value.shape[0], cols[module]) if ab == "A" else (rows[module], value.shape[1])
        if value.dim() != 2 or tuple(value.shape) != want:
            raise FailedPrecondition(f"tensor {name} has shape {list(value.shape)}; {list(want)} was expected "
                                     "for this base")
        prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if block == 'self_attention' else 'mlp'}."
        if module != "query_key_value":
            targets.add(RENAMED[module])
            out[f"{prefix}{RENAMED[module]}.lora_{ab}.weight"] = value
            continue
        targets.update(("q_proj", "k_proj", "v_proj"))
        # A is shared: each projection gets its own copy (safetensors stores no aliased tensors)
        parts = (value, value.clone(), value.clone()) if ab == "A" else value.split([q, kv, kv])
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            out[f"{prefix}{proj}.lora_{ab}.weight"] = part.contiguous()
    if not out:
        raise FailedPrecondition("the adapter holds no LoRA weights")
    return out, targets


def convert_lora(src: Path, dst: Path, base_dir: Path, base: GlmBase, overwrite: bool) -> AdapterConvertResult:
    from safetensors.torch import save_file

    raw = read_lora_config(src)
    files = weight_files(src, "adapter_model")
    if not files:
        raise NotFound("adapter_model.safetensors (or adapter_model.bin) is missing")
    source = SourceCheckpoint(files)
    try:
        tensors, targets = lora_tensors(source, base)
    finally:
        source.close()
    config = {**raw, "target_modules": sorted(targets), "base_model_name_or_path": str(base_dir)}
    ServedLoraConfig.from_dict(config)  # the daemon's own reader accepts it, or this raises naming the field
    with merge_output(dst, overwrite=overwrite, marker="adapter_config.json", field="DST") as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return AdapterConvertResult(dst, "LORA", f"r {raw.get('r', 8)}, alpha {raw.get('lora_alpha', 8)}, "
                                             f"{', '.join(sorted(targets))}")


def convert_chatglm3_adapter(src: str | Path, dst: str | Path, base: str | Path, *,
                             overwrite: bool = False) -> AdapterConvertResult:
    """A LoRA checkpoint (``adapter_config.json`` present) or a P-Tuning v2 one into a PEFT adapter at ``dst``."""
    src, dst, base_dir = Path(src), Path(dst), Path(base)
    if not src.is_dir():
        raise NotFound("SRC is not a directory")
    glm = GlmBase.read(base_dir)
    if math.gcd(glm.heads, glm.groups) != glm.groups:
        raise FailedPrecondition("--base: num_attention_heads is not a multiple of num_key_value_heads")
    if (src / "adapter_config.json").is_file():
        return convert_lora(src, dst, base_dir, glm, overwrite)
    return convert_prefix(src, dst, base_dir, glm, overwrite)
