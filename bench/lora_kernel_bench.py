"""Micro-benchmark of the batched LoRA decode kernels (server/kernels/lora_bgmv.py) against the torch paths of
``BatchedLoraLinear`` (issue 6: 32 rows on 32 adapters must cost at most ~9 µs of LoRA a layer).

For one LoRA-wrapped layer of Llama-2-7B's attention (in x out = 4096x4096; q, k, v, o: 128 such layers a
step), tables as the daemon keeps them (bf16, rank-major ``A [R, slots, in]``, ``B [R, slots, out]``, R = 64,
33 slots: slot 0 empty plus 32 adapters) and a decode step's rows (one token each; rows 1 and 32, row i on
slot i + 1, so 32 rows use 32 distinct adapters), rank 16, it times the LoRA delta alone (the base matmul is
timed once beside it, ``base``, for scale):

* dense: the dense torch path (x @ every slot's A, one-hot mask, addmm: what 32 rows run without the kernel);
* gathered: the gathered torch path (each row's A and B gathered, two bmm: what 1 row runs without it);
* kernel: ``lora_delta_`` (shrink + expand, in place on y).

``--qkv`` times an attention's q, k and v instead (issue 18: one shrink for the three), their A tables
stacked as ``LoraGroup`` keeps them (``[3, R, slots, in]``), shapes given as ``IN:Q,K,V`` (default Llama-2-7B
``4096:4096,4096,4096`` and Llama-3-8B's grouped key/value heads ``4096:4096,1024,1024``):

* separate: three ``lora_delta_`` calls (six launches: what transformers' forward runs, one layer at a time);
* grouped: ``lora_group_delta_`` (one shrink over the three, three expands: four launches; the own decoder).

Both are checked against the fp32 reference, and against each other bit for bit (``identical``).

Each method rotates through enough copies of the layer's tables (``--rotate-mb`` of rank rows read a cycle,
default 256 MB, over 4 times the H200's 60 MB L2) that every call reads its weights from HBM, as a decode step
does (128 layers' tables are long evicted when the next step comes back to one). Calls are captured in a
CUDA graph and timed with CUDA events over many replays (the daemon replays decode steps from graphs); a
method whose capture fails is timed eagerly and marked ``eager``. Errors are max |delta - ref| with ref the
fp32 torch product of the same bf16 tables, next to max |ref|.

    python3 bench/lora_kernel_bench.py --json-out lora.json     # on the GPU
    python3 bench/lora_kernel_bench.py --qkv --rows 1,8,32,64 --json-out qkv.json     # q, k, v grouped or not
    python3 bench/lora_kernel_bench.py --device cpu [--qkv]     # tiny shapes, Triton interpreter: a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graph_timing import bench_device, time_cpu, time_cuda

METHODS = ("dense", "gathered", "kernel")
QKV_METHODS = ("separate", "grouped")
LLAMA_LAYERS = 128  # LoRA-wrapped layers a Llama-2-7B decode step runs with q, k, v, o targeted (32 x 4)
LLAMA_ATTENTIONS = 32  # q, k, v groups a Llama-2-7B (or Llama-3-8B) decode step runs


# ---------------------------------------------------------------------------------------------- one shape


def make_layers(in_f: int, out_f: int, args: argparse.Namespace, copies: int) -> list:
    """``copies`` BatchedLoraLinear layers, random tables (slot 0 left at zeros), B of LoRA-like size
    already scaled; the base layer is a bias-free linear (not called by the methods)."""
    import torch
    from torch import nn

    from adapterd.server.adapters.lora import BatchedLoraLinear

    dev, dtype = torch.device(args.device), torch.bfloat16
    gen = torch.Generator(dev).manual_seed(in_f * 7 + out_f)
    base = nn.Linear(in_f, out_f, bias=False, device="meta")  # shape only: no memory
    layers = []
    for _ in range(copies):
        layer = BatchedLoraLinear(base, args.slots, args.max_rank, dtype, dev)
        with torch.no_grad():
            layer.lora_a[:, 1:].normal_(0.0, in_f**-0.5, generator=gen)
            layer.lora_b[:, 1:].normal_(0.0, 0.5 * args.rank**-0.5, generator=gen)
        layers.append(layer)
    return layers


def bench_shape(in_f: int, out_f: int, row_counts: list[int], args: argparse.Namespace) -> list[dict]:
    """Every row count for one layer shape; one result dict a row count."""
    import torch

    on_gpu = args.device.startswith("cuda")
    read_bytes = args.rank * args.slots * (in_f + out_f) * 2  # rank rows of both tables, every slot (dense)
    copies = max(2, -(-int(args.rotate_mb * 2**20) // read_bytes)) if on_gpu else 2
    layers = make_layers(in_f, out_f, args, copies)
    n_weights = max(2, -(-int(args.rotate_mb * 2**20) // (2 * in_f * out_f))) if on_gpu else 2
    weights = [torch.randn(out_f, in_f, device=args.device, dtype=torch.bfloat16) * in_f**-0.5
               for _ in range(n_weights)]
    results = []
    for m in row_counts:
        results.append(bench_rows(m, layers, weights, args))
        print(format_line(results[-1]), flush=True)
    return results


def bench_rows(m: int, layers: list, weights: list, args: argparse.Namespace) -> dict:
    """One decode step's rows: check each method's delta once against the fp32 reference, then time them."""
    import torch
    import torch.nn.functional as F

    from adapterd.server.adapters.lora import LoraRows
    from adapterd.server.kernels.lora_bgmv import lora_delta_, plan, reference_delta

    dev, dtype, r, num_slots = args.device, torch.bfloat16, args.rank, args.slots
    first = layers[0]
    in_f, out_f = first.in_features, first.out_features
    gen = torch.Generator(dev).manual_seed(m)
    x = torch.randn(m, 1, in_f, device=dev, dtype=dtype, generator=gen)  # a decode step: one token a row
    y0 = torch.randn(m, 1, out_f, device=dev, dtype=dtype, generator=gen)
    slots = (torch.arange(m, device=dev) % (num_slots - 1)) + 1  # row i on slot i + 1: distinct adapters
    # Each torch path's rows: gathered reads slots and rank, dense the one-hot too.
    gathered = LoraRows(slots, r)
    dense = LoraRows(slots, r, F.one_hot(slots, num_slots).bool()[:, None, None, :])
    x2, y2 = x.view(m, in_f), y0.view(m, out_f)
    y_kernel = y2.clone()  # the timed kernel calls add into it, in place, over and over
    ref = reference_delta(x2, first.lora_a, first.lora_b, slots, r)
    with torch.no_grad():
        y_check = y2.clone()
        lora_delta_(y_check, x2, first.lora_a, first.lora_b, slots, r)
        deltas = {"dense": torch_path(first, x, y0, dense).view(m, out_f).float() - y2.float(),
                  "gathered": torch_path(first, x, y0, gathered).view(m, out_f).float() - y2.float(),
                  "kernel": y_check.float() - y2.float()}
    methods = {
        "base": [lambda w=w: F.linear(x2, w) for w in weights],
        "dense": [lambda layer=layer: torch_path(layer, x, y0, dense) for layer in layers],
        "gathered": [lambda layer=layer: torch_path(layer, x, y0, gathered) for layer in layers],
        "kernel": [lambda layer=layer: lora_delta_(y_kernel, x2, layer.lora_a, layer.lora_b, slots, r)
                   for layer in layers],
    }
    result = {"shape": f"{in_f}x{out_f}", "rows": m, "rank": r, "slots": num_slots, "copies": len(layers),
              "plan": plan(in_f, out_f, r), "ref_max": ref.abs().max().item()}
    for name, calls in methods.items():
        with torch.no_grad():
            us, mode = (time_cuda(calls, args.per_graph, args.replays) if dev.startswith("cuda")
                        else time_cpu(calls, args.iters))
        result[name] = {"us": us, "mode": mode}
        if name in deltas:
            result[name]["err"] = (deltas[name] - ref).abs().max().item()
    result["current"] = "dense" if 3 * m >= num_slots else "gathered"  # what LoraSlotTable.rows_for picks
    return result


def torch_path(layer, x, y, rows):
    """What ``BatchedLoraLinear`` adds to y on the torch paths (``rows.onehot`` picks dense or gathered)."""
    from adapterd.server.adapters.lora import shrink

    return layer.expand(x, y, rows, shrink(layer.lora_a[None], x, rows)[0])


# ---------------------------------------------------------------------------------------------- q, k, v


def make_groups(in_f: int, widths: list[int], args: argparse.Namespace, copies: int) -> list:
    """``copies`` q, k, v table sets: (A stacked [3, R, slots, in], [B_q, B_k, B_v]), as LoraGroup holds
    them (random, slot 0 zeros, B of LoRA-like size already scaled)."""
    import torch

    dev = torch.device(args.device)
    gen = torch.Generator(dev).manual_seed(in_f * 7 + sum(widths))
    groups = []
    for _ in range(copies):
        a = torch.zeros(len(widths), args.max_rank, args.slots, in_f, device=dev, dtype=torch.bfloat16)
        a[:, :, 1:].normal_(0.0, in_f**-0.5, generator=gen)
        bs = [torch.zeros(args.max_rank, args.slots, w, device=dev, dtype=torch.bfloat16) for w in widths]
        for b in bs:
            b[:, 1:].normal_(0.0, 0.5 * args.rank**-0.5, generator=gen)
        groups.append((a, bs))
    return groups


def bench_qkv(in_f: int, widths: list[int], row_counts: list[int], args: argparse.Namespace) -> list[dict]:
    """Every row count for one attention shape: three ``lora_delta_`` calls against one grouped call."""
    read_bytes = args.rank * args.slots * (len(widths) * in_f + sum(widths)) * 2
    copies = max(2, -(-int(args.rotate_mb * 2**20) // read_bytes)) if args.device.startswith("cuda") else 2
    groups = make_groups(in_f, widths, args, copies)
    results = []
    for m in row_counts:
        results.append(bench_qkv_rows(m, groups, args))
        print(format_qkv_line(results[-1]), flush=True)
    return results


def bench_qkv_rows(m: int, groups: list, args: argparse.Namespace) -> dict:
    """One decode step's rows through q, k, v: check both ways once (reference, each other), then time them."""
    import torch

    from adapterd.server.kernels.lora_bgmv import lora_delta_, lora_group_delta_, plan, reference_delta

    dev, r = args.device, args.rank
    a, bs = groups[0]
    in_f, widths = a.shape[3], [b.shape[2] for b in bs]
    gen = torch.Generator(dev).manual_seed(m)
    x = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16, generator=gen)
    y0s = [torch.randn(m, w, device=dev, dtype=torch.bfloat16, generator=gen) for w in widths]
    slots = (torch.arange(m, device=dev) % (args.slots - 1)) + 1  # row i on slot i + 1: distinct adapters

    def separate(ys: list, a: torch.Tensor, bs: list) -> None:
        for y, a_g, b in zip(ys, a, bs, strict=True):
            lora_delta_(y, x, a_g, b, slots, r)

    def grouped(ys: list, a: torch.Tensor, bs: list) -> None:
        lora_group_delta_(ys, x, a, bs, slots, r)

    ways = {"separate": separate, "grouped": grouped}
    checks = {name: [y.clone() for y in y0s] for name in QKV_METHODS}
    for name in QKV_METHODS:
        ways[name](checks[name], a, bs)
    refs = [reference_delta(x, a_g, b, slots, r) for a_g, b in zip(a, bs, strict=True)]
    ys = [y.clone() for y in y0s]  # the timed calls add into them, in place, over and over
    result = {"shape": f"{in_f}:{','.join(map(str, widths))}", "rows": m, "rank": r, "slots": args.slots,
              "copies": len(groups), "plan": plan(in_f, widths[0], r),
              "identical": all(map(torch.equal, checks["separate"], checks["grouped"]))}
    for name in QKV_METHODS:
        calls = [lambda a=a, bs=bs, way=ways[name]: way(ys, a, bs) for a, bs in groups]
        us, mode = (time_cuda(calls, args.per_graph, args.replays) if dev.startswith("cuda")
                    else time_cpu(calls, args.iters))
        err = max((y.float() - y0.float() - ref).abs().max().item()
                  for y, y0, ref in zip(checks[name], y0s, refs, strict=True))
        result[name] = {"us": us, "mode": mode, "err": err}
    return result


def _line(r: dict, names: tuple[str, ...], width: int, tail: str) -> str:
    """One result as a line: its shape, each method's time (and error), then ``tail``."""
    parts = [f"{r['shape']:>{width}} rows={r['rows']:<3} r={r['rank']}"]
    for name in names:
        c = r[name]
        err = f" err {c['err']:.2e}" if "err" in c else ""
        parts.append(f"{name} {c['us']:8.2f} µs{err}" + ("" if c["mode"] in ("graph", "cpu") else f" ({c['mode']})"))
    return " | ".join([*parts, tail])


def _markdown(header: list[str], rows: list[list[str]], note: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n\n" + note


def format_line(r: dict) -> str:
    kernel, current = r["kernel"]["us"], r[r["current"]]["us"]
    return _line(r, ("base",) + METHODS, 10,
                 f"today ({r['current']}) / kernel {current / kernel:.2f}x | max |delta| {r['ref_max']:.3g}")


def summary(results: list[dict]) -> str:
    rows = []
    for r in results:
        current, kernel = r[r["current"]]["us"], r["kernel"]["us"]
        rows.append([r["shape"], str(r["rows"]), str(r["rank"])] + [f"{r[n]['us']:.1f}" for n in ("base",) + METHODS]
                    + [r["current"], f"{current / kernel:.2f}", f"{current * LLAMA_LAYERS / 1e3:.2f}",
                       f"{kernel * LLAMA_LAYERS / 1e3:.2f}"])
    return _markdown(["shape (in x out)", "rows", "rank", "base µs", "dense µs", "gathered µs", "kernel µs",
                      "today's path", "today / kernel", "LoRA ms a step today", "LoRA ms a step, kernel"], rows,
                     f"ms a step: µs a layer x {LLAMA_LAYERS} (Llama-2-7B, q/k/v/o targeted), if every layer were "
                     "this shape.")


def format_qkv_line(r: dict) -> str:
    return _line(r, QKV_METHODS, 16, f"separate / grouped {r['separate']['us'] / r['grouped']['us']:.2f}x | "
                 f"identical {r['identical']}")


def qkv_summary(results: list[dict]) -> str:
    rows = [[r["shape"], str(r["rows"]), str(r["rank"]), f"{r['separate']['us']:.1f}", f"{r['grouped']['us']:.1f}",
             f"{r['separate']['us'] / r['grouped']['us']:.2f}",
             f"{(r['separate']['us'] - r['grouped']['us']) * LLAMA_ATTENTIONS / 1e3:.3f}", str(r["identical"])]
            for r in results]
    return _markdown(["in:q,k,v", "rows", "rank", "separate µs", "grouped µs", "separate / grouped",
                      "saved ms a step", "bit-identical"], rows,
                     f"saved ms a step: (separate - grouped) x {LLAMA_ATTENTIONS} attentions (Llama-2-7B / "
                     "Llama-3-8B, q, k, v targeted).")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu (tiny shapes, "
                   "TRITON_INTERPRET=1 set for you)")
    p.add_argument("--rows", default="1,32", help="comma-separated row counts (one token each)")
    p.add_argument("--shapes", default=None, help="comma-separated INxOUT (default 4096x4096 on the GPU)")
    p.add_argument("--rank", type=int, default=16, help="the step's rank bucket (rank rows read)")
    p.add_argument("--max-rank", type=int, default=64, help="R, the tables' rank rows (the daemon's default)")
    p.add_argument("--slots", type=int, default=33, help="table slots, slot 0 (no adapter) included")
    p.add_argument("--rotate-mb", type=float, default=256.0, help="bytes each method cycles through")
    p.add_argument("--per-graph", type=int, default=50, help="calls captured in one CUDA graph")
    p.add_argument("--replays", type=int, default=40, help="graph replays timed")
    p.add_argument("--iters", type=int, default=3, help="calls timed on the CPU")
    p.add_argument("--tile-elems", type=int, help="override lora_bgmv.TILE_ELEMS (tuning the heuristics)")
    p.add_argument("--num-warps", type=int, help="override lora_bgmv.NUM_WARPS (tuning the heuristics)")
    p.add_argument("--qkv", nargs="*", metavar="IN:Q,K,V", help="time q, k, v grouped against separate instead "
                   "(default shapes 4096:4096,4096,4096 4096:4096,1024,1024 on the GPU)")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.device = bench_device(args.device)
    on_gpu = args.device.startswith("cuda")
    if not on_gpu:
        if args.shapes is None and not args.qkv:
            args.rank, args.max_rank, args.slots = min(args.rank, 8), min(args.max_rank, 8), min(args.slots, 5)
    from adapterd.server.kernels import lora_kernel_available

    if not lora_kernel_available(args.device):
        raise SystemExit(f"the LoRA kernel cannot run on {args.device} (Triton missing, or TRITON_INTERPRET=0?)")
    if not 0 < args.rank <= args.max_rank or args.slots < 2:
        raise SystemExit("need 0 < --rank <= --max-rank and --slots >= 2")
    from adapterd.server.kernels import lora_bgmv

    lora_bgmv.TILE_ELEMS = args.tile_elems or lora_bgmv.TILE_ELEMS  # read by plan() at each call
    lora_bgmv.NUM_WARPS = args.num_warps or lora_bgmv.NUM_WARPS
    row_counts = [int(m) for m in args.rows.split(",")]
    machine = torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else "cpu (Triton interpreter)"
    print(f"{machine}; bf16; R = {args.max_rank}, {args.slots} slots, rank {args.rank}; kernel tiles of "
          f"{lora_bgmv.TILE_ELEMS} elements, {lora_bgmv.NUM_WARPS} warps")
    if args.qkv is not None:
        specs = args.qkv or (["4096:4096,4096,4096", "4096:4096,1024,1024"] if on_gpu else ["64:96,32,32"])
        groups = [(int(i), [int(w) for w in ws.split(",")]) for i, ws in (spec.split(":") for spec in specs)]
        results = [r for in_f, widths in groups for r in bench_qkv(in_f, widths, row_counts, args)]
        print("\n" + qkv_summary(results))
    else:
        shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes
                  else [(4096, 4096)] if on_gpu else [(64, 96)])
        results = [r for in_f, out_f in shapes for r in bench_shape(in_f, out_f, row_counts, args)]
        print("\n" + summary(results))
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "results": results}, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
