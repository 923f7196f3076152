"""Where a decode step's device time goes: the kernels of one captured decode graph, by device time.

serve_bench ``--profile-dir DIR`` calls ``profile_graph`` after its speed measurements: the graph of the
batch-1 step (no LoRA) and of the batch-N step with N adapters, each replayed ``REPLAYS`` times under the torch
profiler (CUPTI records each kernel of a graph replay). The table gives, per kernel name, launches and device
microseconds a step, their share of the step, and a family (int8 matmul, norm, attention, ...) so that a line
such as "int8 matmul 2.9 of 4.5 ms" says what to work on next. Written to ``DIR/<label>.txt`` (temporary name,
then renamed) and printed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

REPLAYS = 20
TOP = 30
# Kernel name patterns a family each, first match wins (kernel names as CUPTI reports them).
FAMILIES = (
    ("split-K / int8 matmul", r"_int8_mm|_int8_gemm|_splitk_reduce"),
    ("LoRA", r"bgmv|lora|^_shrink$|^_expand$"),  # lora_bgmv.py's kernels are named _shrink and _expand
    ("norm", r"rms_norm|_rms_norm_rows"),
    ("rotary + append", r"rope_append"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("dense GEMV (ours)", r"^_gemv$"),  # dense_gemv.py's one-row kernel
    ("dense matmul", r"gemm|gemv|nvjet|cutlass|sm90|ampere|cublas"),
    ("copy", r"copy|Memcpy|memcpy|cat|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|kernel|silu_mul"),
)


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.I):
            return label
    return "other"


def kernel_times(graph: torch.cuda.CUDAGraph, replays: int = REPLAYS) -> tuple[dict[str, tuple[float, float]], float]:
    """{kernel name: (launches a step, device us a step)} over ``replays`` replays, and the wall ms a
    replay (with the profiler on). Call on the thread that owns the graph's stream (the engine thread)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time  # us
    return ({name: (n / replays, us / replays) for name, (n, us) in totals.items()},
            start.elapsed_time(end) / replays)


def table(label: str, times: dict[str, tuple[float, float]], wall_ms: float) -> str:
    """The kernels by device time a step, then the families' totals."""
    step_us = sum(us for _, us in times.values())
    if not step_us:
        return f"## {label}: the profiler recorded no kernel ({wall_ms:.3f} ms a replay)\n"
    lines = [f"## {label}: {step_us / 1000:.3f} ms of kernels a step, {sum(n for n, _ in times.values()):.0f} "
             f"launches; {wall_ms:.3f} ms a replay (profiler on)", "",
             "| kernel | family | launches | us a step | share |", "| --- | --- | --- | --- | --- |"]
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
    for name, (n, us) in ranked[:TOP]:
        lines.append(f"| {name[:90]} | {family(name)} | {n:.0f} | {us:.1f} | {us / step_us:.1%} |")
    if len(ranked) > TOP:
        rest = ranked[TOP:]
        lines.append(f"| ({len(rest)} more) | | {sum(n for _, (n, _) in rest):.0f} | "
                     f"{sum(us for _, (_, us) in rest):.1f} | {sum(us for _, (_, us) in rest) / step_us:.1%} |")
    by_family: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (n, us) in times.items():
        by_family[family(name)][0] += n
        by_family[family(name)][1] += us
    lines += ["", "| family | launches | us a step | share |", "| --- | --- | --- | --- |"]
    for fam, (n, us) in sorted(by_family.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {fam} | {n:.0f} | {us:.1f} | {us / step_us:.1%} |")
    return "\n".join(lines) + "\n"


def profile_graph(runtime, batch: int, with_lora: bool, label: str, out_dir: Path) -> str | None:
    """Profile the engine's captured decode graph of ``batch`` rows (the largest context bucket captured;
    with LoRA or without), write and return its table; None when no such graph was captured."""
    cache = runtime.engine.runner.decoder.graphs
    keys = [k for k in cache.keys() if k[0] == batch and (k[2] > 0) == with_lora]
    if not keys:
        return None
    graph, _ = cache.entry(max(keys))
    times, wall = runtime.engine.call(lambda: kernel_times(graph)).result(120)
    text = table(f"{label}, decode graph {max(keys)} (rows, context bucket, LoRA rank)", times, wall)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (re.sub(r"[^\w.-]+", "_", label) + ".txt")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(text, flush=True)
    return text
