"""A tiny Triton kernel run once per process and device before the engine swaps in the real ones.

``import triton`` succeeding says little: the first launch of any kernel compiles a small C launcher with
the machine's C compiler (``CC``, else gcc or clang) against Python's headers, and an image without them
fails there, at the first request. Running this kernel makes that failure happen at start-up, where
``support.triton_available`` turns it into the PyTorch fallback. Imports Triton: import it lazily.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

SIZE = 8  # elements: one block, one program


def _add_one(x_ptr, n, BLOCK: tl.constexpr):  # noqa: N803 (Triton's naming)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)


@functools.cache
def _kernel(interpret: bool):
    """Jitted once per mode: ``triton.jit`` reads TRITON_INTERPRET when it wraps the function."""
    return triton.jit(_add_one)


def run(device: torch.device) -> None:
    """Compile (the first time in this process and Triton cache) and run the kernel on ``device``; raises
    whatever Triton raises, or RuntimeError when the kernel ran but computed a wrong result."""
    from .support import interpreting

    x = torch.arange(SIZE, dtype=torch.float32, device=device)
    _kernel(interpreting())[(1,)](x, SIZE, BLOCK=SIZE)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous launch failure surfaces here, not later
    if not torch.equal(x.cpu(), torch.arange(1, SIZE + 1, dtype=torch.float32)):
        raise RuntimeError(f"the test kernel computed {x.cpu().tolist()}")
