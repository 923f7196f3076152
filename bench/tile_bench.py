"""The int8 one-row matmuls' tiles timed inside the engine's decode step (issue 18).

At one row each int8 weight shape runs one GEMV tile of one split (``int8_matmul``; the tile the q/k/v and
gate/up epilogues run too). The autotuner times each tile alone after a read that evicts L2
(``support.quick_bench``), the warm-up's judge each after an RMSNorm in a CUDA graph
(``int8_linear._judge_one_row``), and the engine's start then tries the judge's fastest few inside the decode
step itself (``engine/step_tuning.py``). This bench asks whether that pick is the step's best: for each one-row
int8 key and each GEMV tile of one split, it sets that tile for that key alone (``int8_matmul._CHOSEN``),
captures the decode graph afresh and reports the engine's step and the graph replayed alone (ms a step), beside
the judge's time for the tile, the tuned tile marked.

    python3 bench/tile_bench.py --shape llama2-7b --ctx 512

On the CPU (the tiny shape) no int8 kernel is tuned and nothing is timed: the tests run it end to end that way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from results_table import git_commit
from serve_bench import SHAPES, build_model_dir, engine_step_ms, replay_ms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new", type=int, default=48, help="decode steps timed per measurement")
    parser.add_argument("--work", default="/tmp/adapterd-bench")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return parser.parse_args()


def one_row_keys() -> dict[tuple, dict]:
    """The int8 kernel's tuned one-row keys (compiled, row bucket 1) -> the config each runs now."""
    from adapterd.server.kernels import int8_matmul

    return {key: config for key, config in int8_matmul._CHOSEN.items() if not key[0] and key[1] == 1}


def measure(runtime, key: tuple, config: dict, args) -> tuple[float, float | None]:
    """(engine ms a step, graph replayed alone ms) at one row with ``config`` for ``key``, captured afresh."""
    runtime.engine.call(lambda: use_tile(runtime, key, config)).result(60)
    engine_step_ms(runtime, 1, args.ctx, 4, [None])  # captures the graph, not timed
    return engine_step_ms(runtime, 1, args.ctx, args.new, [None]), replay_ms(runtime, 1)


def main() -> int:
    args = parse_args()
    from adapterd.server.engine import EngineConfig
    from adapterd.server.kernels.int8_configs import one_row_tiles
    from adapterd.server.kernels.int8_linear import one_row_judgements, tile_name
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    base = load_base_model(base_dir, "int8" if device.type == "cuda" else "none", device=str(device))
    runtime = Runtime(base, work / "adapters", EngineConfig(max_batch_size=8, lora_slots=1, max_lora_rank=16,
                                                            max_prefill_tokens=args.ctx * 2, own_decoder=True))
    runtime.engine.start()
    lines = []
    try:
        engine_step_ms(runtime, 1, args.ctx, 8, [None])  # warm-up and tuning
        keys = one_row_keys()
        judged = one_row_judgements()
        if not keys:
            print("no one-row int8 key tuned (the int8 kernel runs on a CUDA device): nothing to time", flush=True)
        for key, tuned in keys.items():
            shape = f"{key[2]}x{key[3]}"
            for config in one_row_tiles():
                ms, dev = measure(runtime, key, config, args)
                mark = " (tuned)" if all(tuned.get(k) == v for k, v in config.items()) else ""
                us = judged.get(key, {}).get(tile_name(config))
                line = (f"| {shape} | {tile_name(config)}{mark} | {ms:.3f} | {dev:.3f} | "
                        f"{'' if us is None else f'{us:.1f}'} |")
                print(line, flush=True)
                lines.append(line)
            runtime.engine.call(lambda key=key, tuned=tuned: use_tile(runtime, key, tuned)).result(60)
    finally:
        runtime.close()
    if lines and not args.no_record:
        record(lines, args, torch.cuda.get_device_name(0))
    return 0


def use_tile(runtime, key: tuple, config: dict) -> None:
    """Run ``config`` for the one-row key ``key`` from the next capture on (on the engine's thread)."""
    from adapterd.server.kernels import int8_matmul

    int8_matmul._CHOSEN[key] = config
    runtime.engine.runner.decoder.graphs.clear()


def record(lines: list[str], args, machine: str) -> None:
    head = [f"\n### tile_bench: {args.shape}, int8, one row, ctx {args.ctx}, on {machine}",
            f"commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. ms a decode step with the "
            "GEMV tile named for that weight shape's one-row key (the others as tuned), every graph captured afresh; "
            "the warm-up judge's us a call after a norm (int8_linear.one_row_judgements), whose fastest is the tuned.",
            "", "| shape | tile | engine step | graph alone | judge us |", "| --- | --- | --- | --- | --- |"]
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
