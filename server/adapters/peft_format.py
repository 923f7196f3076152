"""The one reader of PEFT adapter directories: serving, merging, listing and the trainer's export use it.

An adapter directory is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. Pickled weights (``adapter_model.bin``) are refused, never unpickled. What is
read here, and how, follows PEFT 0.21 (``tuners/lora/config.py``, ``tuners/prefix_tuning/config.py``,
``tuners/lora/layer.py``):

- a typed config per adapter type with PEFT's defaults (a LoRA config without ``lora_alpha`` has alpha 8,
  without ``r`` rank 8); a field of the wrong type is FailedPrecondition naming the field;
- one pairing rule for LoRA tensors: ``[base_model.model.]<module>.lora_A[.<adapter name>].weight`` and
  its ``lora_B``; any other tensor (embeddings, biases, DoRA magnitudes, modules_to_save) is refused;
- one validation: A is ``[r, in]`` and B ``[out, r]`` with ``r`` the config's rank for that module (PEFT's
  ``rank_pattern``, else ``r``: PEFT could not load other shapes), every value finite, and each module's
  scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, ``alpha_pattern`` honoured) a finite number.

What a consumer supports beyond the format (serving refuses ``fan_in_fan_out``; the merger refuses prompt
learning) is its own policy; the fit to a particular base is checked where the base is known.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataLoss, FailedPrecondition
from ..pinned import HostBufferPool
from .files import (
    MAX_COUNT,
    MAX_LISTED_TARGETS,
    adapter_file,
    listed_text,
    read_config,
    read_weights,
)
from .ids import CONFIG_FILE, WEIGHTS_FILE
from .patterns import pattern_value

PEFT_PREFIX = "base_model.model."  # PEFT's saved keys start with it; module names are what follows
BIN_FILE = "adapter_model.bin"
LORA, PREFIX_TUNING = "LORA", "PREFIX_TUNING"
# The one pairing rule. PEFT's ``get_peft_model_state_dict`` drops the adapter name (".default") when it
# saves; keys that kept one (``.lora_A.default.weight``) name the same tensors.
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# LoRA variants whose math is more than ``x @ A^T @ B^T * scaling`` on a linear weight: no consumer
# supports them, so the format refuses them, with a reason.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA adapters with a bias on B are not supported",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
    "trainable_token_indices": "adapters with trainable token indices are not supported",
    "target_parameters": "adapters that target nn.Parameter (target_parameters) are not supported",
}
BIAS_VALUES = ("none", "all", "lora_only")  # PEFT's; "all"/"lora_only" save base biases, refused as tensors


def _bad(name: str, wanted: str, value: Any) -> FailedPrecondition:
    return FailedPrecondition(f"{CONFIG_FILE}: {name} must be {wanted}, not {listed_text(value)[:40]}")


def _count(raw: dict[str, Any], name: str, default: int | None) -> int | None:
    """A positive integer field (a rank, a count), ``default`` when absent or null."""
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        raise _bad(name, "a positive integer", value)
    return value


def _flag(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return bool(value)


def _patterns(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FailedPrecondition(f"{CONFIG_FILE}: {name} must be an object mapping patterns to values")
    return value


def _targets(raw: dict[str, Any]) -> list[str] | str | None:
    """PEFT's ``target_modules``: a list of names, one regular expression (a string), or none."""
    value = raw.get("target_modules")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise _bad("target_modules", "a list of module names or a regular expression", value)


def peft_type(raw: dict[str, Any]) -> str:
    """The config's ``peft_type`` ("" when absent); FailedPrecondition when it is not a string."""
    value = raw.get("peft_type", "")
    if not isinstance(value, str):
        raise FailedPrecondition(f"{CONFIG_FILE}: peft_type must be a string")
    return value


@dataclass(frozen=True)
class LoraConfig:
    """The fields of PEFT's ``LoraConfig`` that decide the weights' meaning, with PEFT's defaults.

    ``raw`` is the config as read (merges write it back with their changes)."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    base_model_name_or_path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoraConfig:
        """Parse and check a LoRA config; FailedPrecondition names the field at fault."""
        for key, reason in _UNSUPPORTED.items():
            if raw.get(key):
                raise FailedPrecondition(reason)
        alpha = raw.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise _bad("lora_alpha", "a number", alpha)
        bias = raw.get("bias") or "none"
        if bias not in BIAS_VALUES:
            raise _bad("bias", f"one of {', '.join(BIAS_VALUES)}", bias)
        return cls(r=_count(raw, "r", 8) or 8, lora_alpha=alpha, use_rslora=_flag(raw, "use_rslora"),
                   rank_pattern=_patterns(raw, "rank_pattern"), alpha_pattern=_patterns(raw, "alpha_pattern"),
                   target_modules=_targets(raw), fan_in_fan_out=_flag(raw, "fan_in_fan_out"), bias=bias,
                   base_model_name_or_path=str(raw.get("base_model_name_or_path") or ""), raw=raw)

    def rank_of(self, module: str) -> int:
        """The module's rank as PEFT builds it: its ``rank_pattern`` entry, else ``r``."""
        rank = pattern_value(self.rank_pattern, module, self.r, "rank_pattern")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise _bad(f"rank_pattern of {module!r}", "a positive integer", rank)
        return rank

    def scaling(self, module: str) -> float:
        """PEFT's ``LoraLayer.update_layer``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, per module;
        FailedPrecondition unless it is a finite number."""
        alpha = pattern_value(self.alpha_pattern, module, self.lora_alpha, "alpha_pattern")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise FailedPrecondition(f"lora_alpha of {module!r} must be a number, not {type(alpha).__name__}")
        r = self.rank_of(module)
        try:
            scaling = float(alpha) / (math.sqrt(r) if self.use_rslora else r)
        except OverflowError:  # an integer alpha beyond any float
            scaling = math.inf
        if not math.isfinite(scaling):
            raise FailedPrecondition(f"lora_alpha of {module!r} gives the non-finite scaling {scaling}")
        return scaling

    @property
    def peft_rank(self) -> int:
        """The rank PEFT's ``add_weighted_adapter`` checks: ``r``, or the largest in ``rank_pattern``."""
        return max([self.r, *(self.rank_of(k) for k in self.rank_pattern)])


@dataclass(frozen=True)
class PrefixConfig:
    """The fields of PEFT's ``PrefixTuningConfig`` (a ``PromptLearningConfig``) that shape the saved table.

    ``num_virtual_tokens`` has no default in PEFT; the model-derived ones (``num_layers``, ``token_dim``,
    ``num_attention_heads``) are None until PEFT fills them from the base, as ``save_pretrained`` records."""

    num_virtual_tokens: int
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1  # PEFT: 1 for a decoder-only model, 2 for encoder-decoder
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    base_model_name_or_path: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrefixConfig:
        tokens = _count(raw, "num_virtual_tokens", None)
        if tokens is None:
            raise FailedPrecondition(f"{CONFIG_FILE}: num_virtual_tokens is missing")
        return cls(num_virtual_tokens=tokens, num_layers=_count(raw, "num_layers", None),
                   token_dim=_count(raw, "token_dim", None),
                   num_attention_heads=_count(raw, "num_attention_heads", None),
                   num_transformer_submodules=_count(raw, "num_transformer_submodules", 1) or 1,
                   encoder_hidden_size=_count(raw, "encoder_hidden_size", None),
                   prefix_projection=_flag(raw, "prefix_projection"),
                   base_model_name_or_path=str(raw.get("base_model_name_or_path") or ""))


@dataclass
class LoraModule:
    """One module's LoRA factors, as saved: ``a`` ``[r, in]``, ``b`` ``[out, r]``; its delta is
    ``scaling * b @ a`` (transposed where the layer stores its weight ``(in, out)``: ``fan_in_fan_out``)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape ``(out, in)``, as PEFT's ``get_delta_weight``."""
        return torch.mm(self.b.float(), self.a.float()) * self.scaling


def pair_lora_keys(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module name (PEFT's, without ``base_model.model.``) -> (A key, B key), in the file's order.
    FailedPrecondition for a tensor that is not a LoRA A/B weight or a module missing one of the two."""
    keys: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = LORA_KEY.match(key)
        if not m:
            raise FailedPrecondition(f"unexpected tensor {key!r} in a LoRA adapter: only the lora_A/lora_B "
                                     "weights of linear layers are supported (no embeddings, biases, DoRA "
                                     "magnitudes or modules_to_save)")
        keys.setdefault(m["module"], {})[m["which"]] = key
    if not keys:
        raise FailedPrecondition("the adapter holds no LoRA weights")
    for module, ab in keys.items():
        if set(ab) != {"A", "B"}:
            raise FailedPrecondition(f"module {module!r} lacks its lora_A or lora_B weight")
    return {module: (ab["A"], ab["B"]) for module, ab in keys.items()}


def _extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor in one reduction, NaN when it holds a NaN (``aminmax`` propagates
    it); ~15x cheaper than ``isfinite(t).all()`` on a bf16 host tensor, and it allocates nothing large."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def largest(name: str, tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor``; FailedPrecondition naming ``name`` when a value is NaN or
    infinite. One NaN or inf in a shared slot table reaches other rows through exact zeros (0 x inf = NaN),
    so nothing non-finite is ever loaded."""
    low, high = _extremes(tensor)
    if math.isnan(low) or math.isnan(high):
        raise FailedPrecondition(f"{name} holds NaN")
    if math.isinf(low) or math.isinf(high):
        raise FailedPrecondition(f"{name} holds an infinite value")
    return max(-low, high)


def span_largest(tensors: list[torch.Tensor]) -> float | None:
    """The largest magnitude over ``tensors`` in ONE reduction when they tile one buffer (a file read
    whole: ``read_tensors``), NaN when any value is NaN; None when they do not (the caller then goes tensor
    by tensor). 256 small reductions took ~20 ms on a 16-core host, mostly waking threads."""
    first = tensors[0]
    if any(t.dtype != first.dtype or not t.is_contiguous()
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return None
    start = min(t.storage_offset() for t in tensors)
    end = max(t.storage_offset() + t.numel() for t in tensors)
    if end - start != sum(t.numel() for t in tensors):  # gaps: bytes that belong to no tensor of this file
        return None
    low, high = _extremes(first.new_empty(0).set_(first.untyped_storage(), start, (end - start,)))
    return max(-low, high)


def check_finite(tensors: dict[str, torch.Tensor]) -> float:
    """The largest magnitude over every tensor; FailedPrecondition naming the first non-finite one."""
    if not tensors:
        return 0.0
    found = span_largest(list(tensors.values()))
    if found is not None and math.isfinite(found):
        return found
    return max(largest(name, tensor) for name, tensor in tensors.items())


def lora_modules(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """A LoRA adapter's modules, sorted by name: paired, shapes and ranks checked against the config, every
    value finite, each scaling computed (see the module's docstring)."""
    check_finite(tensors)
    modules: dict[str, LoraModule] = {}
    for name, (key_a, key_b) in sorted(pair_lora_keys(tensors).items()):
        a, b = tensors[key_a], tensors[key_b]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FailedPrecondition(f"shapes of {name!r} are lora_A {tuple(a.shape)} and lora_B "
                                     f"{tuple(b.shape)}, not (r, in) and (out, r)")
        rank = config.rank_of(name)
        if a.shape[0] != rank:
            raise FailedPrecondition(f"rank {a.shape[0]} of {name!r} differs from the config's {rank} (r or "
                                     "rank_pattern): PEFT could not load it either")
        modules[name] = LoraModule(a=a, b=b, scaling=config.scaling(name))
    return modules


def prefix_table(config: PrefixConfig, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A prefix adapter's saved table ``[num_virtual_tokens, num_layers * 2 * token_dim]`` (with
    ``prefix_projection`` PEFT saves the projected output, so both kinds have this shape), checked finite."""
    table = tensors.get("prompt_embeddings")
    if table is None or table.dim() != 2 or len(tensors) != 1:
        raise FailedPrecondition("a prefix-tuning adapter must hold one 2-D 'prompt_embeddings' tensor")
    if config.num_transformer_submodules != 1:
        raise FailedPrecondition("prefix adapters for encoder-decoder models are not supported")
    if table.shape[0] != config.num_virtual_tokens:
        raise FailedPrecondition(f"prompt_embeddings has {table.shape[0]} rows for num_virtual_tokens "
                                 f"{config.num_virtual_tokens}")
    largest("prompt_embeddings", table)
    return table


@dataclass
class AdapterFiles:
    """An adapter directory as read: its type, its raw config and its tensors (not yet interpreted)."""

    peft_type: str
    raw: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def read_adapter_config(root: Path, path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter directory ``path``, confined to ``root`` and bounded."""
    return read_config(adapter_file(root, path, CONFIG_FILE))


def read_adapter(root: Path, path: Path, *, pool: HostBufferPool | None = None,
                 max_bytes: int | None = None) -> AdapterFiles:
    """An adapter's config and safetensors weights, each file confined to ``root``; a directory with only
    ``adapter_model.bin`` is FailedPrecondition naming it (pickle is never unpickled)."""
    raw = read_adapter_config(root, path)
    kind = peft_type(raw)
    if not os.path.lexists(path / WEIGHTS_FILE):
        if os.path.lexists(path / BIN_FILE):
            raise FailedPrecondition(f"only safetensors weights are loaded (found {BIN_FILE}: convert it to "
                                     f"{WEIGHTS_FILE}; pickle is never unpickled)")
        raise DataLoss(f"{WEIGHTS_FILE} is missing")
    return AdapterFiles(kind, raw, read_weights(root, path, pool=pool, max_bytes=max_bytes))



def check_adapter(files: AdapterFiles) -> None:
    """Check an adapter read by ``read_adapter`` as every consumer would (config, pairing, shapes, ranks,
    finiteness), without a base: what the trainer runs before it exports an adapter."""
    if files.peft_type == LORA:
        lora_modules(LoraConfig.from_dict(files.raw), files.tensors)
    elif files.peft_type == PREFIX_TUNING:
        prefix_table(PrefixConfig.from_dict(files.raw), files.tensors)
    else:
        raise FailedPrecondition(f"adapter type {files.peft_type!r} is not one adapterd reads")

@dataclass(frozen=True)
class ConfigDescription:
    """What ListAdapters shows of an adapter that is not loaded, or why its config is unusable."""

    type: str = ""
    base_model: str = ""
    rank: int = 0
    num_virtual_tokens: int = 0
    target_modules: list[str] = field(default_factory=list)
    error: str = ""


def describe_config(raw: dict[str, Any]) -> ConfigDescription:
    """The listing's view of a parsed config, read by the typed configs (so with PEFT's defaults: a LoRA
    config without ``r`` lists rank 8); FailedPrecondition for a field that no load could accept. Types that
    are not served are listed with their name and targets, for the load to refuse."""
    kind = peft_type(raw)
    rank = tokens = 0
    if kind == LORA:
        rank = LoraConfig.from_dict(raw).r
    elif kind == PREFIX_TUNING:
        tokens = PrefixConfig.from_dict(raw).num_virtual_tokens
    targets = raw.get("target_modules") or []
    targets = targets if isinstance(targets, list) else [targets]
    return ConfigDescription(
        type=listed_text(kind), base_model=listed_text(raw.get("base_model_name_or_path") or ""), rank=rank,
        num_virtual_tokens=tokens, target_modules=sorted(listed_text(t) for t in targets[:MAX_LISTED_TARGETS]))
