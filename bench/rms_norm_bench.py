"""Micro-benchmark of the fused RMSNorm (server/kernels/rms_norm.py, issue 6) against transformers' LlamaRMSNorm.

For Llama-2-7B's hidden size (4096) at decode row counts (1 and 32 rows), bf16, it times one norm call of
each: ``LlamaRMSNorm.forward`` (~8 small kernels: cast, pow, mean, add, rsqrt, mul, cast, mul) and
``FusedRMSNorm`` (one Triton kernel) sharing its weight. ``--calls`` calls in a row are captured in one CUDA
graph (the daemon replays decode steps from graphs, so launch overhead is excluded as it is there) and the
graph is replayed ``--replays`` times between two CUDA events; the median over ``--repeats`` such runs,
divided by replays x calls, is the time per call. The input stays in L2, as a decode step's activations do.
Each method is also run once eagerly under the profiler to count its CUDA kernels, and its output is
compared with transformers' (max |diff|, share of outputs exactly equal).

GPU only. Prints a table (µs per call, ratio = LlamaRMSNorm / fused) and with ``--json-out PATH`` writes the
results as JSON.

    python3 bench/rms_norm_bench.py --json-out /tmp/rms_norm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def count_kernels(fn) -> int | None:
    """CUDA kernels launched by one eager call of ``fn`` (None where the profiler cannot tell)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception as e:  # a count is a nicety: never fail the timing for it
        print(f"  (kernel count unavailable: {e!r})", file=sys.stderr)
        return None


def time_in_graph(fn, calls: int, replays: int, repeats: int) -> float:
    """Microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed ``replays``
    times between CUDA events; the median of ``repeats`` runs."""
    stream = torch.cuda.Stream()  # warm-up (Triton compiles here, before the capture) on a side stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1e3 / (replays * calls))  # ms -> µs, per call
    del graph
    return statistics.median(runs)


def bench_one(hidden: int, rows: int, dtype: torch.dtype, eps: float, args) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from adapterd.server.kernels import FusedRMSNorm

    gen = torch.Generator().manual_seed(hidden + rows)
    ref = LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=gen))
    ref = ref.to("cuda", dtype).eval()
    fused = FusedRMSNorm.from_module(ref)
    assert fused.weight is ref.weight
    x = (3 * torch.randn(rows, hidden, generator=gen)).to("cuda", dtype)
    y_ref, y_fused = ref(x), fused(x)
    diff = (y_fused.float() - y_ref.float()).abs()
    result = {
        "hidden": hidden, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
        "llama_us": time_in_graph(lambda: ref(x), args.calls, args.replays, args.repeats),
        "fused_us": time_in_graph(lambda: fused(x), args.calls, args.replays, args.repeats),
        "llama_kernels": count_kernels(lambda: ref(x)),
        "fused_kernels": count_kernels(lambda: fused(x)),
        "max_abs_diff": diff.max().item(),
        "exact_share": (y_fused == y_ref).float().mean().item(),
    }
    result["ratio"] = result["llama_us"] / result["fused_us"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--calls", type=int, default=100, help="norm calls captured in one graph")
    parser.add_argument("--replays", type=int, default=50, help="graph replays a timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the median is kept)")
    parser.add_argument("--json-out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("rms_norm_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    from adapterd.server.kernels import fused_rms_norm_available

    if not fused_rms_norm_available("cuda"):
        print("the fused RMSNorm kernel cannot run here (Triton missing or compute capability < 8.0)",
              file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name(0)
    results = []
    with torch.inference_mode():
        for hidden in args.hidden:
            for rows in args.rows:
                results.append(bench_one(hidden, rows, DTYPES[args.dtype], args.eps, args))
    print(f"RMSNorm on {machine}, {args.dtype}, CUDA graph of {args.calls} calls x {args.replays} replays "
          f"(median of {args.repeats})")
    header = (f"{'hidden':>6} {'rows':>5} {'Llama µs':>9} {'fused µs':>9} {'ratio':>6} {'kernels':>8} "
              f"{'max |diff|':>10} {'exact':>6}")
    print(header)
    for r in results:
        kernels = f"{r['llama_kernels']}/{r['fused_kernels']}"
        print(f"{r['hidden']:>6} {r['rows']:>5} {r['llama_us']:>9.2f} {r['fused_us']:>9.2f} {r['ratio']:>6.2f} "
              f"{kernels:>8} {r['max_abs_diff']:>10.3g} {r['exact_share']:>6.3f}")
    if args.json_out:
        import transformers
        import triton

        meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "triton": triton.__version__, "calls": args.calls, "replays": args.replays,
                "repeats": args.repeats, "eps": args.eps}
        args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
