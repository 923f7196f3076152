"""One-row matmuls of a decode step (issue 18): cuBLAS against our GEMV kernels, with and without programmatic
dependent launch (PDL), on Llama-2-7B's shapes.

Methods, per weight shape (out x in):

* ``cublas``: ``F.linear`` on the bf16 weight (what a bf16 base ran before ``kernels/dense_gemv.py``);
* ``gemv``: the bf16 GEMV kernel (``dense_gemv.gemv``, tuned tiles), launched plainly (``ADAPTERD_PDL=0``);
* ``gemv+pdl``: the same kernel launched with PDL (``support.pdl_enabled``): its first weight tile is
  requested before it waits for the kernel before it;
* ``int8`` and ``int8+pdl``: the int8 weight-only kernel (``int8_matmul``, the GEMV tiles at one row) on the
  same shape's int8 weight, without and with PDL.

Two timings a method: ``alone`` (the call after itself, a chain of matmuls) and ``after norm`` (each call is a
fused RMSNorm of the 1-row input, launched the same way, then the matmul on its output: the order of a decode
step, where a small kernel precedes each matmul and PDL lets the matmul's weight stream start under it).
Calls are captured in a CUDA graph and replayed (``graph_timing.time_cuda``), each rotating through enough
weight copies (``--rotate-mb``) that every call reads HBM. GB/s is weight bytes over the ``alone`` time; the
``after norm`` column includes the norm (~2 us alone). Every method's output is checked first against an fp64
product of the same weights (within 1% of max |y|; the run exits 1 otherwise).

    python3 bench/gemv_bench.py                      # on the GPU; appends the table to bench/RESULTS.md
    python3 bench/gemv_bench.py --device cpu --no-record   # tiny shapes in Triton's interpreter: a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from graph_timing import time_cpu, time_cuda
from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## One-row matmuls: cuBLAS against our GEMV kernels, with and without PDL (bench/gemv_bench.py, issue 18)"
INTRO = ("M = 1, bf16 activations. Microseconds a call from CUDA-graph replays, each method rotating through ~256 MB "
         "of weight copies; `alone`: matmul after matmul; `after norm`: a fused RMSNorm then the matmul (the norm "
         "included). GB/s = weight bytes / `alone` time (H200 peak 4.8 TB/s). pdl: launched with programmatic "
         "dependent launch.")
COLUMNS = ("date (UTC)", "commit", "machine", "shape (out x in)", "method", "alone µs", "after norm µs", "GB/s",
           "max err (max |y|)")
# Llama-2-7B's one-row matmuls: o_proj, fused q/k/v, fused gate/up, down_proj, lm_head
GPU_SHAPES = ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (32000, 4096))
CPU_SHAPES = ((48, 64), (40, 96))
METHODS = ("cublas", "gemv", "gemv+pdl", "int8", "int8+pdl")
TOLERANCE = 0.01


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--rotate-mb", type=float, default=256.0, help="weight copies a method cycles through")
    parser.add_argument("--per-graph", type=int, default=64, help="calls captured in one graph")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def _weights(n: int, k: int, copies: int, device: str, seed: int):
    """``copies`` bf16 weights ``[n, k]`` and their int8 row-absmax quantization (CB, SCB) as bitsandbytes
    keeps them."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    scb = w.float().abs().amax(1).clamp_min(1e-8)
    cb = torch.round(w.float() * 127 / scb[:, None]).to(torch.int8)
    w, cb, scb = w.to(device), cb.to(device), scb.to(device)
    return [w.clone() for _ in range(copies)], [(cb.clone(), scb.clone()) for _ in range(copies)]


def _method_calls(method: str, x, norm_weight, ws, qs, after_norm: bool):
    """The calls a method's graph cycles through (one a weight copy), and its output for the first copy."""
    import torch.nn.functional as F

    from adapterd.server.kernels import dense_gemv
    from adapterd.server.kernels.int8_matmul import int8_weight_matmul
    from adapterd.server.kernels.rms_norm import fused_rms_norm

    if method == "cublas":
        def matmul(i, inp):
            return F.linear(inp, ws[i])
    elif method.startswith("gemv"):
        def matmul(i, inp):
            return dense_gemv.gemv(inp, ws[i])
    else:
        def matmul(i, inp):
            return int8_weight_matmul(inp, *qs[i])

    def call(i):
        return matmul(i, fused_rms_norm(x, norm_weight, 1e-6) if after_norm else x)

    return [lambda i=i: call(i) for i in range(len(ws))], matmul(0, x)


def bench_shape(n: int, k: int, args: argparse.Namespace) -> list[dict]:
    import torch

    from adapterd.server.kernels import dense_gemv

    copies = max(2, int(args.rotate_mb * 2**20 // (n * k * 3))) if args.device.startswith("cuda") else 2
    ws, qs = _weights(n, k, copies, args.device, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16).to(args.device)
    norm_weight = torch.ones(k, dtype=torch.bfloat16, device=args.device)
    if args.device.startswith("cuda"):
        dense_gemv.warm_up([(ws[0], None)])  # tunes the tiles (the comparison with F.linear is this bench's)
    ref = (x.double() @ ws[0].double().T).float()
    ref_q = (x.double() @ (qs[0][0].double() * qs[0][1].double()[:, None] / 127).T).float()
    rows = []
    for method in args.methods:
        os.environ["ADAPTERD_PDL"] = "1" if method.endswith("+pdl") else "0"
        times = {}
        for after_norm in (False, True):
            calls, y = _method_calls(method, x, norm_weight, ws, qs, after_norm)
            if args.device.startswith("cuda"):
                times[after_norm], mode = time_cuda(calls, args.per_graph, args.replays)
            else:
                times[after_norm], mode = time_cpu(calls, 4)
        want = ref_q if method.startswith("int8") else ref
        err = (y.float() - want).abs().max().item()
        top = want.abs().max().item()
        weight_bytes = n * k * (1 if method.startswith("int8") else 2)
        rows.append({"shape": f"{n}x{k}", "method": method, "alone": times[False], "after_norm": times[True],
                     "gbs": weight_bytes / times[False] / 1e3, "err": err, "top": top, "mode": mode,
                     "ok": err <= TOLERANCE * top})
        print(f"{n}x{k} {method:9s} alone {times[False]:8.2f} us  after norm {times[True]:8.2f} us  "
              f"{rows[-1]['gbs']:7.0f} GB/s  err {err:.2e} (max {top:.2e}) {mode}{'' if rows[-1]['ok'] else ' OVER'}",
              flush=True)
    os.environ.pop("ADAPTERD_PDL", None)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    machine = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    rows = [r for n, k in (GPU_SHAPES if args.device.startswith("cuda") else CPU_SHAPES)
            for r in bench_shape(n, k, args)]
    date, commit = datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), git_commit()
    table = [{"date (UTC)": date, "commit": commit, "machine": machine, "shape (out x in)": r["shape"],
              "method": r["method"], "alone µs": f"{r['alone']:.2f}", "after norm µs": f"{r['after_norm']:.2f}",
              "GB/s": f"{r['gbs']:.0f}", "max err (max |y|)": f"{r['err']:.1e} ({r['top']:.1e})"} for r in rows]
    if not args.no_record:
        append_to_section(RESULTS, SECTION, INTRO, COLUMNS, table)
    bad = [f"{r['shape']} {r['method']}" for r in rows if not r["ok"]]
    if bad:
        print(f"OVER the {TOLERANCE:.0%} tolerance: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
