"""A LoRA adapter read by ``peft_format``, checked against the served base: ``parse_lora``.

``peft_format`` pairs the tensors, checks their shapes, ranks and finiteness and computes each module's
scaling. Here: serving's own policy (no ``fan_in_fan_out``: only ``nn.Linear`` layers are wrapped), the fit
to the base (every module a linear layer the base has, with matching in/out features, rank within
``--max-lora-rank``), and that A and ``B * scaling`` stay finite in the serving dtype, since the slot tables
hold them so (``BatchedLoraLinear.set_slot``): 1e30 * 1e10 overflows fp32, 1e5 overflows fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import FailedPrecondition
from .peft_format import (
    LoraConfig,
    LoraModule,
    largest,
    lora_modules,
    pair_lora_keys,
    span_largest,
)

__all__ = ["LoraModule", "LoraWeights", "parse_lora"]


@dataclass
class LoraWeights:
    """A parsed, validated LoRA adapter, on the host."""

    modules: dict[str, LoraModule]
    rank: int  # the largest rank over its modules
    target_modules: list[str] = field(default_factory=list)  # short names, e.g. q_proj


def _check_base_fit(name: str, module: LoraModule, shapes: dict[str, tuple[int, int]], max_rank: int) -> None:
    shape = shapes.get(name)
    if shape is None:
        raise FailedPrecondition(f"the base has no linear layer {name!r}: was this adapter made for "
                                 "another architecture?")
    if module.a.shape[1] != shape[0] or module.b.shape[0] != shape[1]:
        raise FailedPrecondition(
            f"shapes of {name!r} do not fit the base: lora_A {tuple(module.a.shape)}, lora_B "
            f"{tuple(module.b.shape)}, base layer in={shape[0]} out={shape[1]}")
    if not module.rank <= max_rank:
        raise FailedPrecondition(f"rank {module.rank} of {name!r} is not in 1..{max_rank}, the daemon's maximum "
                                 "LoRA rank (--max-lora-rank)")


def _check_served(keys: tuple[str, str], module: LoraModule, dtype: torch.dtype) -> None:
    """A and ``B * scaling`` within ``dtype``; the failure names the tensor."""
    served, limit = str(dtype).removeprefix("torch."), torch.finfo(dtype).max
    if largest(keys[0], module.a) > limit:
        raise FailedPrecondition(f"{keys[0]} overflows {served}, the serving dtype")
    if largest(keys[1], module.b) * module.scaling > limit:
        raise FailedPrecondition(f"{keys[1]} times its scaling {module.scaling:g} overflows {served}, "
                                 "the serving dtype")


def parse_lora(config: LoraConfig, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               max_rank: int, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """The adapter's modules, checked against the base (``shapes``: name -> (in, out)) and the serving
    ``dtype``. Raises FailedPrecondition when the adapter does not fit the base."""
    if config.fan_in_fan_out:
        raise FailedPrecondition("fan_in_fan_out (GPT-2 Conv1D) adapters are not supported")
    modules = lora_modules(config, tensors)
    for name, module in modules.items():
        _check_base_fit(name, module, shapes, max_rank)
    found = span_largest(list(tensors.values()))  # one reduction when the file was read into one buffer
    limit, scale = torch.finfo(dtype).max, max(max(m.scaling for m in modules.values()), 1.0)
    if found is None or not math.isfinite(found) or found * scale > limit:
        keys = pair_lora_keys(tensors)
        for name, module in modules.items():  # find the tensor at fault, to name it
            _check_served(keys[name], module, dtype)
    for module in modules.values():
        module.a, module.b = module.a.contiguous(), module.b.contiguous()
    targets = sorted({n.rsplit(".", 1)[-1] for n in modules})
    return LoraWeights(modules=modules, rank=max(m.rank for m in modules.values()), target_modules=targets)

