"""What a kernel compiled to when it was launched on this GPU: the PTX of each specialization Triton cached for it
(the divisibility and the ones it saw at run time, which the sm90 compile tests can only assume)."""

from __future__ import annotations

import re


def launched_ptx(kernel) -> list[str]:
    """The PTX of every compiled variant of ``kernel`` (a ``triton.jit`` function, or an autotuner over one) in
    this process, on any device."""
    while not hasattr(kernel, "device_caches"):  # an Autotuner wraps the JITFunction (whose .fn is plain Python)
        kernel = kernel.fn
    return [compiled.asm["ptx"] for cache in kernel.device_caches.values() for compiled in cache[0].values()]


def narrow_global_accesses(ptx: str) -> list[str]:
    """The global loads and stores of 2 bytes (one bf16 or fp16 element a time): a tile read or written that way
    takes 8 times the instructions of 16-byte accesses."""
    return re.findall(r"(?:ld|st)\.global[\w.:]*\.b16\b", ptx)
