"""Timing a one-row matmul the way a batch-1 decode step runs it: the warm-ups' judge (issue 18).

An autotuner times each candidate alone, after a read that evicts L2 (``support.quick_bench``). A decode step
runs its matmuls differently: back to back in one CUDA graph, each after the kernel that makes its input (an
RMSNorm, the attention's merge), under programmatic dependent launch (PDL): a GEMV's weight stream starts while
the kernel before it still runs, and its last tiles overlap the next kernel's start. Which tile wins depends on
that overlap, not only on the kernel's time alone: on the H200 at 3e04977 the float GEMV's judge against cuBLAS
needed it (bench/NOTES.md, "Seventeenth session"), and at e18cce3 ``bench/tile_bench.py`` found the int8
autotuner's one-row pick 0.022 ms a step behind the step's best tile for the 4096x11008 weight.

``in_step_us`` times a candidate as a step runs it: after an RMSNorm that makes its input, in a CUDA graph of
``CALLS`` such pairs (``support.graph_us``), over the weight and copies of it that together read ``L2_TIMES``
the L2 cache (so each call reads HBM, as decode does). ``dense_gemv.warm_up`` judges the float GEMV against
``F.linear`` with it; ``int8_linear.warm_up`` picks the int8 GEMV's one-row tile with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

# Copies of the weight: together with it at least this many times the L2 cache, at most COPY_BYTES of copies
L2_TIMES = 3
COPY_BYTES = 512 << 20
# and at most this many (a small model's weights are read partly from L2 then; a test model's 4 KB weight would
# otherwise take 131,071 copies and a graph of as many calls)
MAX_COPIES = 255
CALLS = 24  # norm + matmul pairs a graph (rounded up to a multiple of the copies)
REPLAYS = 5  # replays of the graph timed


def copies_for(size: int, l2: int) -> int:
    """Copies of a ``size``-byte weight to make besides it: with it, ``L2_TIMES`` times an ``l2``-byte cache or
    more, at most ``COPY_BYTES`` of copies and ``MAX_COPIES`` of them (none for a weight that is that size
    already)."""
    return max(0, min(-(-L2_TIMES * l2 // size) - 1, COPY_BYTES // size, MAX_COPIES))


def in_step_us(x: torch.Tensor, weight: torch.Tensor, runs: Sequence[Callable[[torch.Tensor, torch.Tensor], object]],
               replays: int = REPLAYS) -> list[float]:
    """Microseconds a call of each of ``runs`` (each takes an input row like ``x`` and a weight like ``weight``)
    after an RMSNorm that makes its input, as in a decode step (the norm's time included: the same for every
    run), by ``support.graph_us`` over ``weight`` and ``copies_for`` copies of it (fewer where memory is short:
    the smaller weights then partly read from L2). A run that cannot launch raises (``graph_us`` runs each
    twice before capture)."""
    from .rms_norm import MAX_HIDDEN, fused_rms_norm, fused_rms_norm_available
    from .support import graph_us

    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 64 << 20)
    copies = [weight]
    try:
        copies += [weight.clone() for _ in range(copies_for(weight.numel() * weight.element_size(), l2))]
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
    scale = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    normed = fused_rms_norm_available(x.device) and x.shape[-1] <= MAX_HIDDEN  # else judged without it

    def step(run: Callable, w: torch.Tensor) -> None:
        run(fused_rms_norm(x, scale, 1e-6) if normed else x, w)

    calls = -(-CALLS // len(copies)) * len(copies)
    try:
        return [graph_us([functools.partial(step, run, w) for w in copies], calls, replays) for run in runs]
    finally:
        del copies
        torch.cuda.empty_cache()
