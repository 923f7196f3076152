"""A decode step's greedy pick: the one-launch kernel (server/kernels/greedy_pick.py) against the same in torch
(``sampling_ops.greedy_pick``: argmax, isfinite, all, stack; and with minimum-length rows a clone and the EOS ban
first), at Llama-2's 32,000-token vocabulary and Llama-3's 128,256 (issue 18: the kernel reads a row in one
program, ``BLOCK`` logits a step of its loop: 32 dependent steps a row at 128k).

For each vocabulary, row count and logits dtype it checks that both give the same tokens and flags (half the
rows banned, EOS ids among the largest logits so that the ban matters), then times each in a CUDA graph over
enough copies of the logits (``--rotate-mb``) that every call reads them from HBM, as a step does (the lm_head
just wrote them, so in a step they may still be in L2: the figure here is the worse case). Ratios are torch's time
over the kernel's (above 1: the kernel is faster).

    python3 bench/pick_bench.py --json-out pick.json                 # on the GPU
    python3 bench/pick_bench.py --device cpu --vocabs 300 --rows 1,3  # Triton's interpreter: a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from graph_timing import bench_device, time_cpu, time_cuda
from results_table import append_to_section, git_commit

METHODS = ("torch", "kernel")
EOS = (2, 128001, 128009)  # Llama-2's, and Llama-3's two (ids past a smaller vocabulary are dropped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu (Triton's interpreter)")
    p.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--rows", default="1,32", help="comma-separated row counts")
    p.add_argument("--dtypes", default="bfloat16,float32", help="the logits' dtypes (the lm_head's output)")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="logits bytes each method cycles through")
    p.add_argument("--per-graph", type=int, default=50, help="calls captured in one CUDA graph")
    p.add_argument("--replays", type=int, default=40, help="graph replays timed")
    p.add_argument("--iters", type=int, default=2, help="calls timed on the CPU")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def bench_case(vocab: int, rows: int, dtype, args: argparse.Namespace) -> dict:
    """One (vocabulary, rows, dtype): both ways checked against each other, then timed."""
    import torch

    from adapterd.server.engine.sampling_ops import greedy_pick as torch_pick
    from adapterd.server.kernels.greedy_pick import greedy_pick as kernel_pick

    dev = args.device
    eos = torch.tensor([e for e in EOS if e < vocab] or [vocab - 1], device=dev)
    bans = (torch.arange(rows, device=dev) % 2).to(torch.int32)  # every other row under its minimum length
    copies = max(2, int(args.rotate_mb * 2**20) // (rows * vocab * torch.tensor([], dtype=dtype).element_size()))
    copies = min(copies, 64) if dev.startswith("cuda") else 2
    gen = torch.Generator(dev).manual_seed(vocab + rows)
    logits = []
    for _ in range(copies):
        t = torch.randn(rows, vocab, device=dev, generator=gen).to(dtype)
        t[:, eos] = t.max() + 1  # EOS the largest: a banned row must pick another column
        t[:, vocab // 2] = t[:, vocab // 3]  # and a tie somewhere (the first column wins)
        logits.append(t)
    same = all(torch.equal(kernel_pick(t, bans, eos), torch_pick(t, bans, eos)) for t in logits[:2])
    ways = {"torch": torch_pick, "kernel": kernel_pick}
    result = {"vocab": vocab, "rows": rows, "dtype": str(dtype).removeprefix("torch."), "copies": copies,
              "same": same}
    for name in METHODS:
        calls = [lambda t=t, pick=ways[name]: pick(t, bans, eos) for t in logits]
        us, mode = (time_cuda(calls, args.per_graph, args.replays) if dev.startswith("cuda")
                    else time_cpu(calls, args.iters))
        result[name] = {"us": us, "mode": mode}
    return result


def line(r: dict) -> str:
    t, k = r["torch"]["us"], r["kernel"]["us"]
    return (f"| {r['vocab']} | {r['rows']} | {r['dtype']} | {t:.2f} | {k:.2f} | {t / k:.2f} | "
            f"{'yes' if r['same'] else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.device = bench_device(args.device)
    on_gpu = args.device.startswith("cuda")
    from adapterd.server.kernels.greedy_pick import greedy_pick_available

    if not greedy_pick_available(args.device):
        raise SystemExit(f"the pick kernel cannot run on {args.device} (Triton missing, or TRITON_INTERPRET=0?)")
    machine = torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else "cpu (Triton interpreter)"
    print(f"{machine}: greedy pick, half the rows banning EOS; us a call (graphs of {args.per_graph} calls)")
    print("| vocab | rows | logits | torch us | kernel us | torch / kernel | same tokens |\n" + "|---" * 7 + "|")
    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                results.append(bench_case(vocab, rows, dtype, args))
                print(line(results[-1]), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    if not args.no_record:
        stamp = f"{git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}"
        append_to_section(Path(__file__).resolve().parent / "RESULTS.md", "### pick_bench: the greedy pick",
                          "us a call in CUDA graphs, logits read from HBM; torch = sampling_ops.greedy_pick, "
                          "kernel = kernels/greedy_pick.py; half the rows banning EOS.",
                          ["run", "vocab", "rows", "logits", "torch us", "kernel us", "torch / kernel", "same"],
                          [{"run": stamp, "vocab": str(r["vocab"]), "rows": str(r["rows"]), "logits": r["dtype"],
                            "torch us": f"{r['torch']['us']:.2f}", "kernel us": f"{r['kernel']['us']:.2f}",
                            "torch / kernel": f"{r['torch']['us'] / r['kernel']['us']:.2f}",
                            "same": "yes" if r["same"] else "NO"} for r in results])
    return 0 if all(r["same"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
