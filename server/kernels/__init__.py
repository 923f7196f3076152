"""Custom kernels for serving. Importing this package does not import Triton: ``int8_weight_matmul``,
``MAX_KERNEL_ROWS`` and ``lora_delta_`` (which need it) load on first access; check
``int8_kernel_available(device)`` or ``lora_kernel_available(device)`` first."""

from __future__ import annotations

from typing import Any

import torch

from .int8_linear import Int8WeightOnlyLinear, int8_kernel_available, use_int8_kernel, warm_up
from .rms_norm import FusedRMSNorm, fused_rms_norm_available, use_fused_rms_norm
from .support import triton_available

__all__ = ["FusedRMSNorm", "fused_rms_norm_available", "use_fused_rms_norm",
           "LORA_KERNEL_MAX_ROWS", "MAX_KERNEL_ROWS", "Int8WeightOnlyLinear", "int8_kernel_available",
           "int8_weight_matmul", "lora_delta_", "lora_kernel_available", "use_int8_kernel", "warm_up"]

# The most rows (one token each) for which BatchedLoraLinear hands a forward to ``lora_delta_``: a decode
# step of the engine's largest batch. The kernels take any row count; more rows are a prefill's, which
# the torch paths (batched matmuls over all tokens) serve better.
LORA_KERNEL_MAX_ROWS = 64


def lora_kernel_available(device: torch.device | str) -> bool:
    """True when the batched LoRA decode kernels (``lora_bgmv``) can run for tensors on ``device``
    (``triton_available``)."""
    return triton_available(device)


def __getattr__(name: str) -> Any:
    if name in ("int8_weight_matmul", "MAX_KERNEL_ROWS"):
        from . import int8_matmul

        return getattr(int8_matmul, name)
    if name == "lora_delta_":
        from . import lora_bgmv

        return lora_bgmv.lora_delta_
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
