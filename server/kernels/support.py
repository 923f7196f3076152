"""Where the Triton kernels of this package can run. Imports neither Triton nor bitsandbytes at import time:
the daemon runs without Triton (CPU, or an image without it).

On CUDA, ``triton_available`` also compiles and runs a tiny kernel once per process and device
(``probe.py``): Triton builds a small C launcher with a C compiler at first use, and a machine without one
(or without Python's headers) must fall back to the PyTorch paths at start-up, with one warning saying why
and how to fix it, rather than fail at its first request."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's own TRITON_INTERPRET parser accepts
_FALSE = ("0", "false", "off", "no", "n")
_CAUSE_CHARS = 300  # enough for the exception and the start of a compiler command line


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def pdl_enabled(device: torch.device | str) -> bool:
    """Whether this package's decode kernels launch with programmatic dependent launch (PDL) on ``device``: a
    CUDA device of compute capability 9.0 or later (Hopper), compiled kernels (not the interpreter), and
    ``ADAPTERD_PDL`` not ``0`` (the benches' switch, to time the step both ways).

    What it buys: a kernel launched this way may start while the kernel before it in the stream is still
    running, once every program of that one has called ``gdc_launch_dependents`` (or exited); it must call
    ``gdc_wait`` before it reads anything an earlier kernel wrote. The matmuls issue their first weight loads
    (bytes no kernel of the step writes) before that wait, so a weight stream starts while the small kernel
    before it (a norm, the attention's merge, SiLU * up) still runs, instead of after a full drain of the
    GPU; the LoRA kernels likewise their slot and their first A or B tile (the slots are the step's inputs,
    copied in before its first kernel; the tables change only between steps). Each kernel here waits before
    any other read (and before any early return: a kernel that could end before the one before it would break
    the chain) and triggers its dependents only after its own wait, so at most two kernels overlap and every
    kernel still sees all writes of every kernel before it."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return False
    if os.environ.get("ADAPTERD_PDL", "").strip().lower() in _FALSE:
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def pdl_launch(device: torch.device | str) -> dict[str, bool]:
    """A PDL kernel's launch keywords on ``device``: ``USE_PDL`` (the kernel's constexpr that makes it wait,
    ``gdc_wait``, and then trigger its dependents) with Triton's ``launch_pdl`` where ``pdl_enabled``, else none
    (the kernels' ``USE_PDL`` defaults to off)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_FLUSH_BYTES = 256 << 20  # read between two timed calls: past any L2 (the H200's is 50 MB), none of it dirty
_BENCH_CALLS = 8  # (flush, call) pairs a graph
_BENCH_REPLAYS = 4


def _flush_reader(index: int) -> Callable[[], object]:
    """A call that reads ``_FLUSH_BYTES`` on CUDA device ``index`` (a sum into a scalar, so no dirty line is left
    to write back during the next call). Its buffer lives as long as the call: nothing is held once tuning is
    over (the caching allocator keeps the block for the pool and the graphs to reuse)."""
    buffer = torch.empty(_FLUSH_BYTES // 4, device=torch.device("cuda", index), dtype=torch.float32)
    sink = torch.empty((), device=buffer.device, dtype=torch.float32)

    def flush() -> None:  # the values do not matter (never read back): only that the bytes pass through L2
        torch.sum(buffer, dim=0, out=sink)

    return flush


@functools.cache
def _flush_us(index: int) -> float:
    """The flush's own microseconds in a graph on device ``index`` (``graph_us``), measured once a process."""
    return graph_us([_flush_reader(index)], _BENCH_CALLS, _BENCH_REPLAYS)


def quick_bench(fn, quantiles=None):  # noqa: ANN001, ANN201 (triton.autotune's do_bench signature)
    """The autotuners' timer (``triton.autotune(do_bench=...)``), in ms: ``fn`` after a read of 256 MB that
    evicts L2 (so it reads HBM, as decode does), each pair captured in a CUDA graph (``graph_us``), less the
    read's own time. No host time is counted: ``triton.testing.do_bench`` timed each call after zeroing a buffer,
    and where a launch took longer on the host than that memset on the device, the gap was counted as the
    call's; its dirty lines were also written back during the call. With ``quantiles`` the same figure for each
    (the autotuner compares the lists)."""
    index = torch.cuda.current_device()
    flush = _flush_reader(index)
    # graph_us runs the pair twice before capturing: a config that cannot launch (OutOfResources) raises there,
    # outside the capture, and the autotuner skips it
    pair_us = graph_us([lambda: (flush(), fn())], _BENCH_CALLS, _BENCH_REPLAYS)
    ms = max(pair_us - _flush_us(index), 0.0) / 1e3
    return [ms] * len(quantiles) if quantiles else ms


def graph_us(calls: list[Callable[[], object]], per_graph: int, replays: int) -> float:
    """Microseconds a call the way a decode step runs its kernels: ``per_graph`` calls (cycling over ``calls``)
    captured in one CUDA graph, back to back (under PDL, each overlapping the one before), replayed ``replays``
    times. No host time is measured (``triton.testing.do_bench`` counted a launch's host time where it took
    longer than the L2 flush before it). The calls are run twice on a side stream first (compilation, lazy
    initialisation, cuBLAS workspaces). Raises where the calls cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls * 2:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for i in range(per_graph):
            calls[i % len(calls)]()
    return replay_ms(graph, replays) * 1e3 / per_graph


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int, untimed: int = 1) -> float:
    """Milliseconds a replay of a captured ``graph``: ``untimed`` replays first (the first uploads it), then
    ``replays`` timed back to back by CUDA events (device time only)."""
    for _ in range(untimed):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def tuner_choices(tuner) -> dict[str, str]:
    """An autotuner's choices so far in this process (``triton.autotune``'s cache), its key joined by ", " ->
    the config; empty for None (the interpreter builds no tuner). The benches print them: fresh machines have
    tuned differently (bench/NOTES.md)."""
    return {} if tuner is None else {", ".join(map(str, key)): str(config) for key, config in tuner.cache.items()}


def triton_into(namespace: dict[str, Any], libdevice: bool = False) -> ModuleType:
    """Import Triton (once) into ``namespace``, a kernel module's ``globals()``, as ``triton`` and ``tl``, and
    with ``libdevice`` its CUDA math library as ``libdevice``: the kernels' bodies refer to them as module
    globals, as Triton wants, and the module must not import Triton at its own import (the daemon runs
    without it). Returns the ``triton`` module."""
    if namespace.get("tl") is None:
        import triton
        import triton.language as tl

        namespace["triton"], namespace["tl"] = triton, tl
    if libdevice and namespace.get("libdevice") is None:
        from triton.language.extra import libdevice as library

        namespace["libdevice"] = library
    return namespace["triton"]


def triton_available(device: torch.device | str) -> bool:
    """True when this package's kernels can run for tensors on ``device``: a CUDA device of compute
    capability 8.0 or later (bf16 tensor cores, loads and conversions) on which Triton compiles and runs a
    test kernel (``kernels_compile``), or any device while TRITON_INTERPRET=1 (Triton's CPU interpreter;
    tests only: it is slow)."""
    device = torch.device(device)
    interpret = interpreting()
    if device.type != "cuda" and not interpret:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda" and not interpret:
        return (torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
                and kernels_compile(device))
    return True


def kernels_compile(device: torch.device) -> bool:
    """Whether a tiny Triton kernel compiles and runs on CUDA ``device``; asked once per process and device.
    When it does not, one warning names the cause and the fix, and the callers keep the PyTorch paths."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _compile_problem(index) is None


@functools.cache
def _compile_problem(index: int) -> str | None:
    """None when the test kernel runs on ``cuda:index``, else the cause (logged once, as a warning)."""
    try:
        from . import probe

        probe.run(torch.device("cuda", index))
    except Exception as exc:  # anything (no compiler, no Python.h, a driver error): no Triton kernels
        cause = _one_line(f"{type(exc).__name__}: {exc}")
        log.warning("Triton kernels off on cuda:%d, the PyTorch paths serve instead (slower): a test kernel "
                    "failed to compile or run (%s); install a C compiler and Python's headers (e.g. apt-get "
                    "install gcc python3-dev) or point CC at one, then restart", index, cause)
        return cause
    return None


def _one_line(text: str) -> str:
    """``text`` on one line, at most ``_CAUSE_CHARS`` characters (a compiler command line can be long)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _CAUSE_CHARS else flat[:_CAUSE_CHARS - 3] + "..."
