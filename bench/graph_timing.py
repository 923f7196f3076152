"""Timing for the kernel benches: calls captured in one CUDA graph and replayed (what the engine does), or
timed on the CPU."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def bench_device(requested: str | None) -> str:
    """The device a kernel bench runs on: ``requested``, else cuda where there is a GPU, else cpu; on the CPU the
    kernels run in Triton's interpreter (``TRITON_INTERPRET``, read by the kernels at each call, set here unless
    the caller set it)."""
    import os

    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def time_cuda(calls: list[Callable[[], object]], per_graph: int, replays: int) -> tuple[float, str]:
    """Microseconds a call: ``per_graph`` calls (cycling over ``calls``) captured in one graph, replayed
    (``support.graph_us``, the engine's warm-up timer); eagerly where they cannot be captured."""
    import torch

    from adapterd.server.kernels.support import graph_us

    try:
        return graph_us(calls, per_graph, replays), "graph"
    except RuntimeError as exc:
        print(f"  capture failed ({str(exc).splitlines()[0][:120]}); timing eagerly", file=sys.stderr)
    torch.cuda.synchronize()

    def run() -> None:
        for i in range(per_graph):
            calls[i % len(calls)]()

    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * per_graph), "eager"


def time_cpu(calls: list[Callable[[], object]], iters: int) -> tuple[float, str]:
    for call in calls:
        call()
    start = time.perf_counter()
    for i in range(iters):
        calls[i % len(calls)]()
    return (time.perf_counter() - start) * 1e6 / iters, "cpu"
