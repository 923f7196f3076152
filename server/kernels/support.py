"""Where the Triton kernels of this package can run. Imports neither Triton nor bitsandbytes at import time:
the daemon runs without Triton (CPU, or an image without it)."""

from __future__ import annotations

import os

import torch

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's own TRITON_INTERPRET parser accepts


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_available(device: torch.device | str) -> bool:
    """True when this package's kernels can run for tensors on ``device``: a CUDA device of compute
    capability 8.0 or later (bf16 tensor cores, loads and conversions) with Triton importable, or any device
    while TRITON_INTERPRET=1 (Triton's CPU interpreter; tests only: it is slow)."""
    device = torch.device(device)
    interpret = interpreting()
    if device.type != "cuda" and not interpret:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda" and not interpret:
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return True
