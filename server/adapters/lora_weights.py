"""LoRA adapter files as PEFT writes them, parsed and checked against the base: ``parse_lora``.

Checked: every tensor is a LoRA A or B of a linear layer the base has, with shapes that fit it and a rank
within ``--max-lora-rank``; each module's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, with
``rank_pattern`` and ``alpha_pattern`` matched as PEFT matches them) is finite; and every A and every B times
its scaling is finite in the serving dtype. One NaN or inf in a shared slot table would reach other rows
through exact zeros (0 x inf = NaN), so nothing non-finite is ever loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterd.server.adapters.patterns import pattern_value
from adapterd.server.errors import FailedPrecondition

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# PEFT features that change the math of a LoRA layer beyond x @ A^T @ B^T * scaling: refused, with a reason.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA adapters with a bias on B are not supported",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D) adapters are not supported",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
    "trainable_token_indices": "adapters with trainable token indices are not supported",
}


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


@dataclass
class LoraWeights:
    """A parsed, validated LoRA adapter, on the host."""

    modules: dict[str, LoraModule]
    rank: int  # the largest rank over its modules
    target_modules: list[str] = field(default_factory=list)  # short names, e.g. q_proj


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, field: str = "alpha_pattern") -> Any:
    """PEFT's pattern rule, matched in linear time (``patterns``: a hostile key must not stall the daemon)."""
    return pattern_value(patterns, module, default, field)


def _extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor in one pass, NaN when it holds a NaN (torch.aminmax propagates it); one
    reduction is ~15x cheaper than ``isfinite(t).all()`` on a bf16 host tensor (a 7B r16 adapter: 3 ms, not 46)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def _largest(name: str, tensor: torch.Tensor) -> float:
    """The largest magnitude in ``tensor``; FailedPrecondition naming ``name`` when a value is NaN or infinite.

    One NaN or inf in a shared table reaches other rows through exact zeros (0 x inf = NaN), so nothing
    non-finite may be loaded at all."""
    low, high = _extremes(tensor)
    if math.isnan(low) or math.isnan(high):
        raise FailedPrecondition(f"{name} holds NaN")
    if math.isinf(low) or math.isinf(high):
        raise FailedPrecondition(f"{name} holds an infinite value")
    return max(-low, high)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """FailedPrecondition naming ``name`` unless every value of ``tensor`` is finite (one reduction)."""
    _largest(name, tensor)


def _scaling(config: dict[str, Any], module: str, r: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for one module; FailedPrecondition unless finite."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise FailedPrecondition(f"lora_alpha of {module!r} must be a number, not {type(alpha).__name__}")
    try:
        scaling = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
    except OverflowError:  # an integer alpha beyond any float
        scaling = math.inf
    if not math.isfinite(scaling):
        raise FailedPrecondition(f"lora_alpha of {module!r} gives the non-finite scaling {scaling}")
    return scaling


def _check_served(keys: dict[str, str], a: torch.Tensor, b: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> None:
    """The slot tables hold A and ``B * scaling`` in the serving dtype (``BatchedLoraLinear.set_slot``): each
    must be finite there. One reduction over each tensor: its largest magnitude (times the scaling, for B) must
    fit the serving dtype; a failure names the tensor and says whether it holds a non-finite value itself or
    overflows (1e30 * 1e10 in fp32, 1e5 in fp16)."""
    served = str(dtype).removeprefix("torch.")
    limit = torch.finfo(dtype).max
    if _largest(keys["A"], a) > limit:
        raise FailedPrecondition(f"{keys['A']} overflows {served}, the serving dtype")
    if _largest(keys["B"], b) * scaling > limit:
        raise FailedPrecondition(f"{keys['B']} times its scaling {scaling:g} overflows {served}, the serving dtype")


def _all_served_at_once(tensors: list[torch.Tensor], scaling: float, dtype: torch.dtype) -> bool:
    """True when one reduction over the file's whole data proves every weight finite and every A and
    ``B * scaling`` within ``dtype``: loaded tensors are views into one buffer, and one call over it costs far less
    than a call per tensor (256 small reductions took ~20 ms on a 16-core host, mostly waking threads). False
    when that cannot be shown in one pass (the caller then checks tensor by tensor, which names the culprit)."""
    first = tensors[0]
    if any(t.dtype != first.dtype or not t.is_contiguous()
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return False
    start = min(t.storage_offset() for t in tensors)
    end = max(t.storage_offset() + t.numel() for t in tensors)
    if end - start != sum(t.numel() for t in tensors):  # gaps: bytes that belong to no tensor of this file
        return False
    span = first.new_empty(0).set_(first.untyped_storage(), start, (end - start,))
    low, high = _extremes(span)
    largest = max(-low, high)  # NaN when any value is NaN: every comparison below is then False
    return largest <= torch.finfo(dtype).max and largest * max(scaling, 1.0) <= torch.finfo(dtype).max


def parse_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               max_rank: int, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Check a PEFT LoRA adapter against the base and compute each module's scaling.

    Scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, per module (``rank_pattern`` and
    ``alpha_pattern`` honoured). Every weight, every scaling and every scaled B in ``dtype`` (the serving
    dtype) must be finite. Raises FailedPrecondition when the adapter does not fit the base.
    """
    for key, reason in _UNSUPPORTED.items():
        if config.get(key):
            raise FailedPrecondition(reason)
    if any("lora_embedding" in k or "lora_magnitude" in k for k in tensors):
        raise FailedPrecondition("LoRA on embeddings and DoRA magnitudes are not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}  # module -> "A"/"B" -> the tensor's name in the file, for messages
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise FailedPrecondition(f"unexpected tensor {key!r} in a LoRA adapter")
        pairs.setdefault(m["module"], {})[m["which"]] = tensor
        keys.setdefault(m["module"], {})[m["which"]] = key
    if not pairs:
        raise FailedPrecondition("the adapter holds no LoRA weights")
    modules: dict[str, LoraModule] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise FailedPrecondition(f"module {name!r} lacks its lora_A or lora_B weight")
        shape = shapes.get(name)
        if shape is None:
            raise FailedPrecondition(f"the base has no linear layer {name!r}: was this adapter made for "
                                     "another architecture?")
        a, b = ab["A"], ab["B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != shape[0] or b.shape[0] != shape[1]:
            raise FailedPrecondition(
                f"shapes of {name!r} do not fit the base: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"base layer in={shape[0]} out={shape[1]}")
        if not 0 < r <= max_rank:
            raise FailedPrecondition(f"rank {r} of {name!r} is not in 1..{max_rank}, the daemon's maximum LoRA "
                                     "rank (--max-lora-rank)")
        modules[name] = LoraModule(a=a.contiguous(), b=b.contiguous(), scaling=_scaling(config, name, r))
    if not _all_served_at_once(list(tensors.values()), max(m.scaling for m in modules.values()), dtype):
        for name, module in modules.items():  # find the tensor at fault, to name it
            _check_served(keys[name], module.a, module.b, module.scaling, dtype)
    targets = sorted({n.rsplit(".", 1)[-1] for n in modules})
    return LoraWeights(modules=modules, rank=max(m.a.shape[0] for m in modules.values()),
                       target_modules=targets)
