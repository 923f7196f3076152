"""Micro-benchmark of the int8 weight-only kernel (server/kernels) against bf16 and bitsandbytes' int8 matmul.

For Llama-2-7B's linear shapes (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down) and the
own decoder's fused projections (server/engine/fused_projections.py: 12288x4096 q+k+v and 22016x4096 gate+up
of Llama-2-7B; 6144x4096 q+k+v with grouped key/value heads and 28672x4096 gate+up of Llama-3-8B) at decode
row counts (M = 1, 8, 32, 64: the split-K kernel) and prefill ones (M = 512, 2048: the tiled GEMM kernel),
with bf16 activations, it times:

* bf16: ``F.linear`` with the dequantized weight in bf16 (what an unquantized base would run);
* bnb: ``bnb.nn.Linear8bitLt`` with ``threshold=0`` (how the daemon loads its int8 base);
* ours: ``Int8WeightOnlyLinear`` sharing that layer's int8 weight and scales.

Above the kernel's ``MAX_KERNEL_ROWS`` (prefill) it also times, printed but not in the table, ``dequant``: the
weight dequantized to bf16 at each call, then ``F.linear`` (the large-M path before the GEMM kernel, and
still ``int8_matmul.dequant_matmul``): the GEMM kernel is worth keeping where ours beats it.

Each method rotates through enough copies of the weight (``--rotate-mb`` per method, default 256 MB, over
4 times the H200's 60 MB L2) that every call reads its weight from HBM, as decode does: one layer's weight
is long evicted when the next step needs it again. Calls are captured in a CUDA graph and timed with CUDA
events over many replays (the daemon replays decode steps from graphs, so launch overhead is excluded as
it is there); a method whose capture fails is timed eagerly and marked ``eager``. Our kernel is warmed up
(autotuned, compiled) for each shape and row bucket before capture, as the daemon must do.

At the decode row counts (M <= 64) it also times the library options on the same int8 bytes (issue 18;
bench/int8_library.py): ``int8pack`` (``torch._weight_int8pack_mm``) and ``torchao`` (torchao's int8
weight-only tensor under ``torch.compile``, ``--torchao-compile``; only where torchao imports). A method that
cannot run here is ``n/a``, its reason printed.

GB/s is weight bytes over time (int8: N*K + 4*N bytes of scales; bf16: 2*N*K); H200 HBM3e peaks at 4.8 TB/s.
Errors are max |y - ref| with ref = x.float() @ (CB * SCB / 127).float().T, next to max |ref|; the weight-only
methods (ours and the libraries) must be within ``TOLERANCE`` (1%) of max |ref|: a row ``OVER`` says which is
not, and the run exits 1 (the speeds of a wrong result are not worth comparing).

    python3 bench/int8_kernel_bench.py                   # on the GPU; appends the tables to bench/RESULTS.md
    python3 bench/int8_kernel_bench.py --device cpu      # tiny shapes, Triton interpreter: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from graph_timing import bench_device, time_cpu, time_cuda
from int8_library import BUILDERS, LIBRARY_METHODS, TOLERANCE, Unavailable
from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## int8 weight-only kernel (bench/int8_kernel_bench.py, issue 6)"
INTRO = ("One linear layer, bf16 activations, M rows: bf16 F.linear vs bitsandbytes Linear8bitLt (threshold 0) "
         "vs our Triton int8 weight-only kernel (server/kernels). Microseconds per call from CUDA-graph replays "
         "(`eager` where a capture failed), each method rotating through ~256 MB of weight copies so every "
         "call reads HBM; GB/s = weight bytes / time (H200 peak 4.8 TB/s); speedup = bf16 time / time. "
         "Errors: max |y - x @ W_dequant^T| for bf16 / bnb / ours, max |y| in parentheses.")
COLUMNS = ("date (UTC)", "commit", "machine", "shape (out x in)", "M", "bf16 µs", "bnb µs", "ours µs",
           "bf16 GB/s", "ours GB/s", "bnb speedup", "ours speedup", "err bf16 / bnb / ours (max |y|)")
LIB_SECTION = "## int8 weight-only matmul against library options (bench/int8_kernel_bench.py, issue 18)"
LIB_INTRO = " ".join((
    "Decode row counts only, same layers and timing as the table above: our Triton kernel against",
    "`torch._weight_int8pack_mm` (int8pack) and torchao's int8 weight-only tensor under torch.compile, all on",
    "bitsandbytes' int8 bytes (bench/int8_library.py). `n/a`: the method cannot run there (the run's log says",
    "why); `-`: not run (`--methods`). Errors as above; weight-only methods must be within 1% of max |y| (`OVER`)."))
LIB_COLUMNS = COLUMNS[:5] + ("ours µs", "int8pack µs", "torchao µs", "bf16 µs", "ours GB/s", "best library GB/s",
                             "err ours / int8pack / torchao (max |y|)", "within 1%")
# Llama-2-7B's three, then the fused ones (issue 18): Llama-2-7B's q+k+v and gate+up, Llama-3-8B's (GQA: 8 key/value
# heads of 128) q+k+v and gate+up
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096), (6144, 4096), (28672, 4096))
CPU_SHAPES = ((48, 64), (40, 100))


def describe_machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, Triton interpreter)"


# ---------------------------------------------------------------------------------------------- layers


def make_layers(n: int, k: int, copies: int, device: str, seed: int) -> list:
    """``copies`` quantized ``Linear8bitLt`` layers of one random weight (quantized once, then deep-copied)."""
    import bitsandbytes as bnb
    import torch

    gen = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
    with torch.no_grad():
        layer.weight = bnb.nn.Int8Params((torch.randn(n, k, generator=gen) * 0.02).half(), requires_grad=False,
                                         has_fp16_weights=False)
    layer = layer.to(device).eval()  # quantizes: weight.data = CB (int8 [n, k]), weight.SCB (float32 [n])
    return [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]


def copies_for(bytes_per_copy: int, rotate_mb: float, device: str) -> int:
    return 2 if not device.startswith("cuda") else max(2, -(-int(rotate_mb * 2**20) // bytes_per_copy))


# ---------------------------------------------------------------------------------------------- one case


def library_calls(ours: list, args: argparse.Namespace) -> dict[str, list | str]:
    """Each library method's calls over the layer copies (``ours``' CB and SCB), or why it cannot run."""
    import torch

    out: dict[str, list | str] = {}
    for name in args.methods:
        try:
            out[name] = [BUILDERS[name](mod.weight.data, mod.scb, torch.bfloat16, args.torchao_compile)
                         for mod in ours]
        except Unavailable as exc:
            print(f"  {name}: n/a ({exc})", flush=True)
            out[name] = str(exc)
    return out


def bench_shape(n: int, k: int, rows: list[int], args: argparse.Namespace) -> list[dict]:
    """All row counts for one weight shape; returns one result dict a row count."""
    import torch
    import torch.nn.functional as F

    from adapterd.server.kernels import Int8WeightOnlyLinear
    from adapterd.server.kernels.int8_matmul import MAX_KERNEL_ROWS, dequant_matmul

    dev, dtype = args.device, torch.bfloat16
    layers = make_layers(n, k, copies_for(n * k, args.rotate_mb, dev), dev, seed=n * 31 + k)
    ours = [Int8WeightOnlyLinear.from_bnb(layer) for layer in layers]  # shares CB/SCB: no copy
    scale = ours[0].scb.float()[:, None] / 127.0
    dense = [(m.weight.data.to(dtype) * (m.scb.float()[:, None] / 127.0).to(dtype))
             for m in ours[:copies_for(2 * n * k, args.rotate_mb, dev)]]
    w_ref = ours[0].weight.data.float() * scale
    library = library_calls(ours, args) if min(rows) <= MAX_KERNEL_ROWS else {}
    results = []
    for m in rows:
        x = torch.randn(m, k, device=dev, generator=torch.Generator(dev).manual_seed(m)).to(dtype)
        ref = x.float() @ w_ref.T
        methods = {"bf16": [lambda w=w, x=x: F.linear(x, w) for w in dense],
                   "bnb": [lambda layer=layer, x=x: layer(x) for layer in layers],
                   "ours": [lambda mod=mod, x=x: mod(x) for mod in ours]}
        if m > MAX_KERNEL_ROWS:  # the old large-M path, for comparison (stdout only)
            methods["dequant"] = [lambda mod=mod, x=x: dequant_matmul(x, mod.weight.data, mod.scb) for mod in ours]
        result: dict = {"shape": f"{n}x{k}", "M": m, "ref_max": ref.abs().max().item()}
        for name, calls in library.items():
            if m > MAX_KERNEL_ROWS:
                continue
            if isinstance(calls, str):
                result[name] = {"na": calls}
            else:
                methods[name] = [lambda call=call, x=x: call(x) for call in calls]
        for name, calls in methods.items():
            result[name] = time_method(calls, ref, args)
            if name == "ours" and m <= MAX_KERNEL_ROWS:
                print_tuning(n, k, m)
        for name, nbytes in (("bf16", 2 * n * k), ("bnb", n * k + 4 * n), ("ours", n * k + 4 * n),
                             ("dequant", n * k + 4 * n), ("int8pack", n * k + 2 * n), ("torchao", n * k + 4 * n)):
            if name in result and "us" in result[name]:
                result[name]["bytes"] = nbytes
        results.append(result)
        print(format_line(result), flush=True)
    return results


def print_tuning(n: int, k: int, m: int, top: int = 6) -> None:
    """The small-M autotuner's fastest configs for this shape, with their times (stdout only; where it tuned
    just now: a cached choice has no timings). Says which tiles win, so the config list can be pruned."""
    from adapterd.server.kernels.int8_matmul import _small_kernels

    tuner = _small_kernels(False)[1]
    timings = getattr(tuner, "configs_timings", None) if tuner is not None else None
    if not timings:
        return
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list | tuple) else kv[1])
    for config, t in ranked[:top]:
        us = (t[0] if isinstance(t, list | tuple) else t) * 1000
        print(f"    tuned {n}x{k} M={m}: {us:7.1f} us  {config}", flush=True)
    tuner.configs_timings = None  # printed once


def time_method(calls: list, ref, args: argparse.Namespace) -> dict:
    """The first call's error against ``ref`` and the time a call, or ``na`` where the first call fails (a
    library path that compiles, say, with no compiler on the machine)."""
    import torch

    try:
        with torch.no_grad():
            err = (calls[0]().float() - ref).abs().max().item()
    except Exception as exc:  # noqa: BLE001 (any failure of a third-party path makes it n/a, with its reason)
        print(f"  n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}", flush=True)
        return {"na": f"{type(exc).__name__}"}
    with torch.no_grad():
        us, mode = (time_cuda(calls, args.per_graph, args.replays) if args.device.startswith("cuda")
                    else time_cpu(calls, args.iters))
    return {"us": us, "mode": mode, "err": err}


def within_tolerance(r: dict) -> dict[str, bool]:
    """Of the weight-only methods that ran, which are within ``TOLERANCE`` x max |ref|."""
    return {name: r[name]["err"] <= TOLERANCE * r["ref_max"] for name in ("ours", *LIBRARY_METHODS)
            if name in r and "err" in r[name]}


def format_line(r: dict) -> str:
    parts = [f"{r['shape']:>11} M={r['M']:<3}"]
    for name in ("bf16", "bnb", "ours", "dequant", *LIBRARY_METHODS):
        if name not in r:
            continue
        c = r[name]
        if "na" in c:
            parts.append(f"{name} n/a")
            continue
        parts.append(f"{name} {c['us']:9.2f} µs {c['bytes'] / c['us'] / 1e3:7.1f} GB/s err {c['err']:.2e}"
                     + ("" if c["mode"] in ("graph", "cpu") else f" ({c['mode']})"))
    over = [name for name, ok in within_tolerance(r).items() if not ok]
    return " | ".join(parts) + f" | max |y| {r['ref_max']:.3g}" + (f" | OVER: {', '.join(over)}" if over else "")


def make_row(r: dict, machine: str, commit: str, date: str) -> dict[str, str]:
    def us(name: str) -> str:
        c = r[name]
        return f"{c['us']:.1f}" + ("" if c["mode"] in ("graph", "cpu") else f" ({c['mode']})")

    def gbs(name: str) -> str:
        return f"{r[name]['bytes'] / r[name]['us'] / 1e3:.0f}"

    bf16 = r["bf16"]["us"]
    errs = " / ".join(f"{r[name]['err']:.2g}" for name in ("bf16", "bnb", "ours")) + f" ({r['ref_max']:.2g})"
    values = (date, commit, machine, r["shape"], str(r["M"]), us("bf16"), us("bnb"), us("ours"), gbs("bf16"),
              gbs("ours"), f"{bf16 / r['bnb']['us']:.2f}", f"{bf16 / r['ours']['us']:.2f}", errs)
    return dict(zip(COLUMNS, values, strict=True))


def library_row(r: dict, machine: str, commit: str, date: str) -> dict[str, str]:
    def cell(name: str, value) -> str:
        return "-" if name not in r else "n/a" if "na" in r[name] else value(r[name])  # not run / cannot run

    libs = [r[name] for name in LIBRARY_METHODS if name in r and "us" in r[name]]
    best = f"{max(c['bytes'] / c['us'] / 1e3 for c in libs):.0f}" if libs else "n/a"
    errs = " / ".join(cell(name, lambda c: f"{c['err']:.2g}") for name in ("ours", *LIBRARY_METHODS))
    ok = within_tolerance(r)
    values = (date, commit, machine, r["shape"], str(r["M"]), cell("ours", lambda c: f"{c['us']:.1f}"),
              *(cell(name, lambda c: f"{c['us']:.1f}") for name in LIBRARY_METHODS),
              cell("bf16", lambda c: f"{c['us']:.1f}"), cell("ours", lambda c: f"{c['bytes'] / c['us'] / 1e3:.0f}"),
              best, errs + f" ({r['ref_max']:.2g})",
              "yes" if all(ok.values()) else "OVER: " + ", ".join(n for n, good in ok.items() if not good))
    return dict(zip(LIB_COLUMNS, values, strict=True))


def markdown(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu (tiny shapes, "
                   "TRITON_INTERPRET=1 set for you)")
    p.add_argument("--rows", default="1,8,32,64,512,2048", help="comma-separated row counts M (above 64: "
                   "prefill, the GEMM kernel)")
    p.add_argument("--shapes", default=None, help="comma-separated OUTxIN (default: Llama-2-7B's three "
                   "and the fused q+k+v and gate+up of Llama-2-7B and Llama-3-8B)")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="weight bytes each method cycles through")
    p.add_argument("--per-graph", type=int, default=50, help="calls captured in one CUDA graph")
    p.add_argument("--replays", type=int, default=40, help="graph replays timed")
    p.add_argument("--iters", type=int, default=3, help="calls timed on the CPU")
    p.add_argument("--methods", default=",".join(LIBRARY_METHODS),
                   help="library methods timed beside ours at M <= 64 (comma-separated; empty: none)")
    p.add_argument("--torchao-compile", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for torchao's linear ('' = eager: the dequantize-then-matmul it runs "
                        "uncompiled)")
    p.add_argument("--machine", help="machine description for the rows (default: detected)")
    p.add_argument("--commit", help="commit for the rows (default: git rev-parse of this checkout)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md (CPU runs never do)")
    p.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--append-from", type=Path, help="only append rows saved with --json-out, then exit")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.torchao_compile = args.torchao_compile or None
    unknown = set(args.methods) - set(LIBRARY_METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))} (choose from {', '.join(LIBRARY_METHODS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.append_from:
        saved = json.loads(args.append_from.read_text())
        saved = saved if isinstance(saved, dict) else {"kernel": saved}  # files written before issue 18: a list
        print(*append_to_section(args.results, SECTION, INTRO, COLUMNS, saved["kernel"]),
              *append_to_section(args.results, LIB_SECTION, LIB_INTRO, LIB_COLUMNS, saved.get("library", [])),
              sep="\n")
        return 0

    args.device = bench_device(args.device)
    from adapterd.server.kernels import int8_kernel_available
    from adapterd.server.kernels.int8_matmul import MAX_KERNEL_ROWS

    if not int8_kernel_available(args.device):
        raise SystemExit(f"the int8 kernel cannot run on {args.device} (Triton missing, or TRITON_INTERPRET=0?)")
    shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else GPU_SHAPES if args.device.startswith("cuda") else CPU_SHAPES)
    rows = [int(m) for m in args.rows.split(",")]
    results = [r for n, k in shapes for r in bench_shape(n, k, rows, args)]
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    machine = args.machine or describe_machine(args.device)
    commit = args.commit or git_commit("server/kernels", "bench/int8_kernel_bench.py", "bench/int8_library.py")
    tables = {"kernel": [make_row(r, machine, commit, date) for r in results],
              "library": [library_row(r, machine, commit, date) for r in results if r["M"] <= MAX_KERNEL_ROWS]}
    print("\n" + markdown(tables["kernel"]) + "\n\n" + markdown(tables["library"], LIB_COLUMNS))
    if args.json_out:
        args.json_out.write_text(json.dumps(tables, ensure_ascii=False, indent=1))
    if args.device.startswith("cuda") and not args.no_append:
        append_to_section(args.results, SECTION, INTRO, COLUMNS, tables["kernel"])
        append_to_section(args.results, LIB_SECTION, LIB_INTRO, LIB_COLUMNS, tables["library"])
        print(f"\nappended {len(tables['kernel'])} + {len(tables['library'])} rows to {args.results}")
    over = [r for r in results if not all(within_tolerance(r).values())]
    if over:
        print(f"{len(over)} case(s) OVER the {TOLERANCE:.0%} tolerance: see the lines marked OVER", file=sys.stderr)
    return 1 if over else 0

if __name__ == "__main__":
    sys.exit(main())
