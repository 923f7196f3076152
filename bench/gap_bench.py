"""Where a batch-1 decode step's time outside its CUDA graph goes (issue 18).

serve_bench reports the engine's one-row step (the median interval between two steps' tokens) and the step's
graph replayed alone; the difference, the "host share", has been 0.04-0.05 ms at one row since 8fc9dbd. With the
engine running a step ahead of its host (engine.py), that is not the host's own time but what runs on the device
between two graphs: the inputs' copy from page-locked memory, the clamp of the last step's tokens into the input
buffer, the tokens' copy to the host and its event. This bench builds the step up from the graph alone, one piece
at a time, on the engine's own ``DecodeStep``, and times each ladder rung over many steps with CUDA events (and
the host's own time a step), so that each piece's cost is the difference between two rungs:

    graph alone        ``graph.replay()`` back to back
    + inputs           ``DecodeStep.run`` with host ids: the inputs' copy, then the replay
    + fed tokens       the last step's device tokens fed back: the copy, the clamp, the replay
    + tokens out       and each step's tokens queued to the host (``SampledTokens``: a copy and an event)
    + run ahead        and, as the engine does, step N's tokens read once step N+1 is launched
    engine step        the engine itself (serve_bench's figure)

    python3 bench/gap_bench.py --shape llama2-7b --quantization int8 --ctx 512

On the CPU (the tiny shape, no graphs) the rungs run eagerly: the tests run it end to end that way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from engine_run import sync
from results_table import git_commit
from serve_bench import SHAPES, build_model_dir, engine_step_ms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--quantization", default="int8" if torch.cuda.is_available() else "none")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="steps timed a rung")
    parser.add_argument("--work", default="/tmp/adapterd-bench")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return parser.parse_args()


def rungs(step, ctx: int) -> list[tuple[str, Callable[[object], object]]]:
    """The ladder: (name, one step given the previous step's result) on ``DecodeStep`` ``step``, one row at
    position ``ctx`` (its entry rewritten each step: the same shape every time)."""
    from adapterd.server.engine.sampling import SampledTokens

    def run(tokens) -> object:  # noqa: ANN001
        return step.run(tokens, [ctx], [ctx], [0])

    def graph_alone(_: object) -> object:
        key = max(k for k in step.graphs.keys() if k[0] == 1 and k[2] == 0)
        step.graphs.entry(key)[0].replay()

    def fed(previous) -> object:  # noqa: ANN001
        out = run([1] if previous is None else previous.greedy[:, 0])
        return out

    def tokens_out(previous) -> object:  # noqa: ANN001
        out = fed(None if previous is None else previous[0])
        return out, SampledTokens(out.greedy[:, 0], pairs=out.greedy)

    def run_ahead(previous) -> object:  # noqa: ANN001
        now = tokens_out(previous)
        if previous is not None:
            previous[1].result()
        return now

    ladder = [("+ inputs", lambda _: run([1])), ("+ fed tokens", fed), ("+ tokens out", tokens_out),
              ("+ run ahead", run_ahead)]
    return ([("graph alone", graph_alone)] if step.use_graphs else []) + ladder


def time_rung(one_step: Callable[[object], object], steps: int, device: torch.device) -> tuple[float, float]:
    """(ms a step on the device clock, ms a step of the host's own time before it waits) over ``steps`` steps
    after a few untimed ones."""
    previous = None
    for _ in range(5):
        previous = one_step(previous)
    sync(device)
    host = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        previous = one_step(previous)
        host += time.perf_counter() - t
    sync(device)
    return (time.perf_counter() - start) / steps * 1000, host / steps * 1000


def main() -> int:
    args = parse_args()
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    base = load_base_model(base_dir, args.quantization, device=str(device))
    runtime = Runtime(base, work / "adapters", EngineConfig(max_batch_size=8, lora_slots=1, max_lora_rank=16,
                                                            max_prefill_tokens=args.ctx * 2, own_decoder=True))
    runtime.engine.start()
    lines = []
    try:
        engine_step_ms(runtime, 1, args.ctx, 8, [None])  # warm-up, tuning, the one-row graph captured
        engine_ms = engine_step_ms(runtime, 1, args.ctx, 64, [None])
        step = runtime.engine.runner.decoder
        for name, one_step in rungs(step, args.ctx):
            ms, host = runtime.engine.call(lambda f=one_step: time_rung(f, args.steps, device)).result(600)
            lines.append(f"| {name} | {ms:.3f} | {host:.3f} |")
            print(lines[-1], flush=True)
        lines.append(f"| engine step (serve_bench's) | {engine_ms:.3f} | |")
        print(lines[-1], flush=True)
    finally:
        runtime.close()
    if not args.no_record:
        record(lines, args, torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU")
    return 0


def record(lines: list[str], args, machine: str) -> None:
    head = [f"\n### gap_bench: {args.shape}, {args.quantization}, one row, ctx {args.ctx}, on {machine}",
            f"commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. A one-row decode step "
            f"built up from its graph alone, {args.steps} steps a rung: ms a step (wall clock over the steps, the "
            "device's pace once the host runs ahead) and the host's own ms a step before it waits.", "",
            "| rung | ms a step | host ms a step |", "| --- | --- | --- |"]
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
