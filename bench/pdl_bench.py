"""Decode steps with programmatic dependent launch (PDL) on and off, at several batch sizes (issue 18).

PDL lets each decode kernel start while the one before it ends (``server/kernels/support.py``). It paid at one
row on the H200 (int8 2.89 -> 2.66 ms a token at 3bf8dff) but cost at 32 (device step 6.66 -> 7.11 ms, same
run): the int8 tensor-core tiles launch without it past ``int8_matmul.PDL_MAX_BUCKET`` rows. This bench says
where such lines are: for each base dtype, each batch size and each setting (``ADAPTERD_PDL``, which the
kernels read at each launch) it captures the engine's decode graphs afresh and reports the engine's step (ms a
step, base rows; and with ``--lora-rows``, that many rows on as many distinct LoRA adapters) and the graph
replayed alone. Ratios are PDL-off time over PDL-on (above 1: PDL pays).

    python3 bench/pdl_bench.py --shape llama2-7b --quantizations int8,none --rows 1,4,8,16,32,64

``--set kernels.int8_expand.PROGRAM_ELEMS=16384`` (repeatable, as serve_bench's) holds a server setting both ways;
the recorded table's header names it.

``--switch shrink,expand`` (comma-separated names, ``bench/pdl_switches.py``'s registry) measures several in turn
after one model load and one warm-up, each against the server's defaults (what one switch set is put back before
the next), and records a table for each, as separate runs would: one device call for several questions.

``--switch epilogues`` compares the same way the one-row GEMVs' epilogues (the fused q/k/v matmul's rotation
and append, the gate/up matmul's SiLU product: ``FusedLinear.rope_append`` and ``silu_glu``) on and off, where
off runs the separate kernels as before them: both ways in one process on one machine, whose differences
(HBM clocks) otherwise swamp a few tens of microseconds between serve_bench runs.

``--switch gemv`` asks, for each float weight shape the warm-up judged (``dense_gemv.judgements``: the GEMV
kernel against ``F.linear``, each after an RMSNorm in a CUDA graph), which of the two a decode step runs faster
with: on = the kernel for that shape, off = ``F.linear``, the other shapes as judged: whether the judge agrees
with the step (it did not when it timed each call alone: bench/NOTES.md, "Seventeenth session").

``--switch fold`` compares o_proj's LoRA delta added in the post-attention add + norm kernel (on:
``rms_norm.OutputDelta`` at every row count) against the expand's own launch (off), with every row of each
``--rows`` batch on its own LoRA adapter (base rows have nothing to fold): where the decoder's
``NORM_FOLD_MIN_ROWS`` should lie.

``--switch side`` compares the LoRA shrinks launched beside their layers' base matmuls on a second CUDA stream
(on: ``engine/side_stream.py``'s ``SIDE_STREAM``) against one stream (off), every row of each ``--rows`` batch on
its own adapter, as ``fold``.

``--switch reduce`` compares the int8 split-K reduction launched with PDL past ``PDL_MAX_BUCKET`` (on:
``int8_matmul.REDUCE_PDL``) against without (off), base rows and ``--lora-rows`` as ``pdl``.

``--switch shrink`` compares the LoRA shrinks run as extra programs of their int8 matmuls' launches (on:
``kernels/int8_shrink.py``'s ``IN_MATMUL``) against their own launches after the matmuls (off), every row on its
own adapter, as ``fold`` (an int8 base only: a float matmul has no such programs).

``--switch dense`` compares a float base's fused q/k/v and gate/up matmuls at 2-64 rows through the split-K
kernel, with their LoRA shrinks in its launch (on: ``kernels/dense_splitk.py``'s ``IN_DECODE`` and
``int8_shrink.IN_MATMUL``, the row bucket tuned when first switched on, and its times against ``F.linear``
printed; a matmul with no shrink takes the kernel only where it timed no slower) against cuBLAS and the shrinks'
own launches (off), base rows and ``--lora-rows`` as ``pdl``: whether a
bf16 step on 32 adapters gains more than the base step may lose (``--quantizations none``: an int8 base's
matmuls are the split-K kernel's already).

``--switch oproj`` compares o_proj's LoRA shrink in its own matmul's launch (on: ``adapters/lora_folds.py``'s
``O_PROJ_IN_MATMUL``) against the attention merge's (off), both ways with every shrink in its split-K matmul's
launch (``int8_shrink.IN_MATMUL``, and over a float base ``dense_splitk.IN_DECODE``, as ``dense``), every row on
its own adapter, as ``fold``.

``--switch expand`` compares o_proj's LoRA delta's sums computed by extra programs of its own split-K matmul's launch
and added by the post-attention add + norm (on: ``kernels/int8_expand.py``'s ``IN_MATMUL``; over a float base o_proj
then runs through the split-K kernel where its bucket is tuned, as ``dense``'s hosting matmuls) against the norm's
own fold of the delta after o_proj's plain matmul (off: cuBLAS over a float base, where the warm-up judged it
faster), every row on its own adapter, as ``fold``.

On the CPU (the tiny shape) it runs end to end, with nothing to switch: the tests use that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from pdl_switches import SWITCHES, Context, Switch, restore, snapshot
from pdl_switches import parse as parse_switches
from results_table import git_commit
from serve_bench import (
    SHAPES,
    TARGET_SETS,
    build_model_dir,
    engine_step_ms,
    make_lora_dirs,
    print_tuned,
    replay_ms,
    set_switch,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--quantizations", default="int8,none")
    parser.add_argument("--rows", default="1,4,8,16,32,64", help="comma-separated batch sizes")
    parser.add_argument("--lora-rows", type=int, default=32, help="also time this many rows on as many distinct "
                        "LoRA adapters (0: not)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--work", default="/tmp/adapterd-bench")
    parser.add_argument("--switch", default="pdl", metavar="NAME[,NAME...]",
                        help=f"what is compared on / off, one or several measured in turn in one process (one model "
                        f"load, one warm-up), each against the defaults: {', '.join(SWITCHES)} (above)")
    parser.add_argument("--lora-targets", choices=sorted(TARGET_SETS), default="attention",
                        help="the adapters' target modules: attention (q, k, v, o) or all (and gate, up, down)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--set", action="append", default=[], metavar="SWITCH=VALUE",
                        help="a server setting held both ways, as serve_bench's ('<module under adapterd.server>."
                             "<attribute>=<Python literal>', as kernels.int8_expand.PROGRAM_ELEMS=16384), repeatable")
    args = parser.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    try:
        args.switches = parse_switches(args.switch)
    except ValueError as e:
        parser.error(f"--switch: {e}")
    try:
        args.settings = [set_switch(setting) for setting in args.set]
    except ValueError as e:
        parser.error(f"--set: {e}")
    if args.settings:
        print(f"set for both ways: {', '.join(args.settings)}", flush=True)
    return args


def measure(runtime, rows: int, adapters: list, args, switch: Switch, on: bool, shape: tuple | None = None,
            ) -> tuple[float, float | None]:
    """(engine ms a step, graph replayed alone ms) at ``rows`` rows, every decode graph captured anew with
    ``switch`` on or off (``gemv``: for the judged float shape ``shape``); what it set is put back after."""
    decoder = runtime.engine.runner.decoder
    ctx = Context(decoder, rows, shape)
    saved = snapshot(switch, ctx)

    def set_on_engine() -> None:  # new captures follow: the decoder and kernels read the switches then
        switch.apply(on, ctx)
        decoder.graphs.clear()

    runtime.engine.call(set_on_engine).result(900)  # --switch dense tunes a row bucket here: compiles, times
    try:
        engine_step_ms(runtime, rows, args.ctx, 4, adapters)  # captures this shape's graph, not timed
        ms = engine_step_ms(runtime, rows, args.ctx, args.new, adapters)
        return ms, (replay_ms(runtime, rows) if not any(adapters) else None)
    finally:
        runtime.engine.call(lambda: (restore(saved), decoder.graphs.clear())).result(60)


def main() -> int:
    args = parse_args()
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    # adapters (and slots): one a row of the largest batch for a switch that puts every row on LoRA, --lora-rows
    # for the others (one switch alone configures the engine as it did before several could run)
    lora_rows = max(max(args.rows) if s.every_row_lora else args.lora_rows for s in args.switches)
    ids = make_lora_dirs(work / "adapters", base_dir, max(lora_rows, 1), targets=TARGET_SETS[args.lora_targets])
    lines: dict[str, list[str]] = {s.name: [] for s in args.switches}
    for q in args.quantizations.split(","):
        base = load_base_model(base_dir, q, device=str(device))
        label = {"none": str(base.dtype).removeprefix("torch."), "int8": "int8", "nf4": "nf4"}[q]
        runtime = Runtime(base, work / "adapters", EngineConfig(
            max_batch_size=max(64, *args.rows), lora_slots=max(lora_rows, 1), max_lora_rank=16,
            max_prefill_tokens=args.ctx * max(args.rows + [lora_rows]), own_decoder=True))
        runtime.engine.start()
        try:
            engine_step_ms(runtime, 2, args.ctx, 8, [None, runtime.store.get(ids[0])])  # warm-up and tuning
            print_tuned(label)  # whether the one-row keys took the GEMV tiles the epilogues run
            for switch in args.switches:
                if len(args.switches) > 1:
                    print(f"--switch {switch.name}:", flush=True)
                lines[switch.name] += measure_switch(runtime, switch, label, ids, args)
        finally:
            runtime.close()
        del runtime, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    if not args.no_record:
        for switch in args.switches:
            record(lines[switch.name], args, switch, machine)
    return 0


def measure_switch(runtime, switch: Switch, label: str, ids: list[str], args) -> list[str]:
    """Each case on and off: every --rows batch (each row on its own adapter where the switch needs LoRA rows,
    else base rows plus --lora-rows rows on as many adapters); a table line each, printed."""
    cases = [(r, [None] * r) for r in args.rows]
    if switch.every_row_lora:  # base rows have nothing to switch
        cases = [(r, [runtime.store.get(a) for a in ids[:r]]) for r in args.rows]
    elif args.lora_rows:
        cases.append((args.lora_rows, [runtime.store.get(a) for a in ids[: args.lora_rows]]))
    shapes = list(judged_shapes()) if switch.per_shape else [None]
    lines = []
    for (rows, adapters), shape in ((case, shape) for case in cases for shape in shapes):
        on = "" if args.lora_targets == "attention" else f" ({args.lora_targets} linears)"
        what = f"{rows} rows" + (f" on {rows} LoRA{on}" if any(adapters) else "")
        if shape is not None:
            what += f", {shape[0]}x{shape[1]}"
        (on_ms, on_dev), (off_ms, off_dev) = (measure(runtime, rows, adapters, args, switch, on, shape)
                                              for on in (True, False))
        dev = "" if on_dev is None else f"{on_dev:.3f} / {off_dev:.3f}"
        line = f"| {label} | {what} | {on_ms:.3f} / {off_ms:.3f} | {off_ms / on_ms:.3f} | {dev} |"
        print(line, flush=True)
        lines.append(line)
        if switch.name == "dense":
            lines += dense_times()
    return lines


def judged_shapes() -> dict[tuple, tuple[float, float, bool]]:
    """The float shapes the GEMV's warm-up judged, printed with its verdict (none on the CPU)."""
    from adapterd.server.kernels import dense_gemv

    judged = dense_gemv.judgements()
    if not judged:
        print("judged: no float shape (the GEMV's warm-up runs on a CUDA device, for bf16 / fp16 weights)", flush=True)
    for (n, k, *_), (ours, theirs, kernel) in judged.items():
        print(f"judged {n}x{k}: GEMV {ours:.1f} us, F.linear {theirs:.1f} us (warm-up judge) -> "
              f"{'GEMV' if kernel else 'F.linear'}", flush=True)
    return judged


def dense_times() -> list[str]:
    """The split-K kernel's warm-up times against ``F.linear`` so far (``dense_splitk.judgements``), printed, as
    lines of the record (none on the CPU)."""
    from adapterd.server.kernels import dense_splitk

    lines = []
    for (bucket, n, k), (ours, theirs) in sorted(dense_splitk.judgements(clear=True).items()):
        line = (f"|  | {n}x{k} at bucket {bucket}: split-K {ours:.1f} us, F.linear {theirs:.1f} us (after a norm) "
                f"|  |  |  |")
        print(line, flush=True)
        lines.append(line)
    return lines


def record(lines: list[str], args, switch: Switch, machine: str) -> None:
    """One table a switch, headed as a run of that switch alone would be."""
    settings = "".join(f" --set {setting}" for setting in args.settings)
    head = [f"\n### pdl_bench{'' if switch.name == 'pdl' else ' --switch ' + switch.name}{settings}: {args.shape}, "
            f"ctx {args.ctx}, on {machine}",
            f"commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. ms a decode step, "
            f"{switch.what} on / off (every decode graph captured afresh each way); ratio off / on (above 1: it "
            "pays).", "",
            "| base | batch | engine step, on / off | off / on | graph alone, on / off |",
            "| --- | --- | --- | --- | --- |"]
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
