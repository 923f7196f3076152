"""Custom kernels for serving. Importing this package does not import Triton: ``int8_weight_matmul`` and
``MAX_KERNEL_ROWS`` (which need it) load on first access; check ``int8_kernel_available(device)`` first."""

from __future__ import annotations

from typing import Any

from adapterd.server.kernels.int8_linear import Int8WeightOnlyLinear, int8_kernel_available, use_int8_kernel, warm_up

__all__ = ["MAX_KERNEL_ROWS", "Int8WeightOnlyLinear", "int8_kernel_available", "int8_weight_matmul",
           "use_int8_kernel", "warm_up"]


def __getattr__(name: str) -> Any:
    if name in ("int8_weight_matmul", "MAX_KERNEL_ROWS"):
        from adapterd.server.kernels import int8_matmul

        return getattr(int8_matmul, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
