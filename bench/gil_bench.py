"""How much a busy Python thread slows the engine, at two GIL switch intervals.

The daemon's gRPC event loop and the engine thread share one interpreter. Every torch call releases the GIL
and takes it back; when another thread is busy with Python (the event loop serializing responses), taking
it back waits until that thread is forced to yield: up to the switch interval, 5 ms by default. This script
runs the engine decoding ``--rows`` greedy rows, alone and beside a thread that runs pure Python without
pause (the worst case of a busy event loop), at each interval, and prints decode steps per second.

    python bench/gil_bench.py                       # tiny model (CPU, or the GPU when there is one)
    python bench/gil_bench.py --intervals-ms 5,1,0.2 --no-record
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from results_table import git_commit
from serve_bench import SHAPES, build_model_dir


class BusyThread:
    """Pure-Python work without pause until stopped: never blocks, so it gives up the GIL only when forced."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(1000):
                x += i

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def steps_per_second(runtime, rows: int, seconds: float) -> float:
    """Decode steps per second with ``rows`` greedy rows kept running (each generates up to the context end;
    they are cancelled at the end)."""
    from adapterd.server.engine import GenerationParams
    from adapterd.server.engine.observer import EngineObserver

    times: list[float] = []

    class Steps(EngineObserver):
        def decode_step(self, rows_, seconds_):
            times.append(time.perf_counter())

    observer = Steps()
    runtime.engine.observers.add(observer)
    params = GenerationParams(max_new_tokens=100_000, min_new_tokens=100_000)
    ids = [f"gil-{time.perf_counter_ns()}-{i}" for i in range(rows)]
    for i, request_id in enumerate(ids):
        runtime.engine.submit(request_id, [10 + i, 11, 12, 13], params, None, lambda event: None)
    time.sleep(0.5)  # admitted and prefilled: time the decode steps only
    start = time.perf_counter()
    time.sleep(seconds)
    end = time.perf_counter()
    for request_id in ids:
        runtime.engine.cancel(request_id)
    runtime.engine.observers.observers.remove(observer)
    return sum(start <= t < end for t in times) / (end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "adapterd-bench"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--intervals-ms", default="5,0.2")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    base_dir = build_model_dir(Path(args.work) / f"model-{args.shape}", args.shape, str(device))
    adapters = Path(args.work) / "gil-adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(load_base_model(base_dir, "none", device=str(device)), adapters,
                      EngineConfig(max_batch_size=max(8, args.rows)))
    runtime.engine.start()
    lines = []
    try:
        steps_per_second(runtime, args.rows, 1.0)  # warm-up (graph captures on a GPU)
        for ms in (float(v) for v in args.intervals_ms.split(",")):
            sys.setswitchinterval(ms / 1000)
            alone = steps_per_second(runtime, args.rows, args.seconds)
            with BusyThread():
                busy = steps_per_second(runtime, args.rows, args.seconds)
            lines.append(f"| {ms:g} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f} |")
            print(lines[-1], flush=True)
    finally:
        runtime.close()
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    table = [f"\n### gil_bench: {args.shape} on {machine}, commit {git_commit()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"{args.rows} greedy rows decoding; {args.seconds:g} s per measurement; the busy thread runs pure "
             "Python without pause.", "",
             "| switch interval ms | decode steps/s alone | beside a busy thread | ratio |",
             "| --- | --- | --- | --- |", *lines]
    print("\n".join(table))
    if not args.no_record:
        with (Path(__file__).resolve().parent / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
