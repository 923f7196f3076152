"""Driving a Runtime's engine from a benchmark: requests submitted in one step, their tokens and event times
collected (shared by serve_bench, its correctness checks and chatglm3_bench)."""

from __future__ import annotations

import statistics
import threading
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timeline:
    """A sink that records when each event of one request arrived."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self.tokens: list[int] = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.times.append((event.kind, time.perf_counter()))
        if event.kind == "end":
            self.tokens = list(event.token_ids)
            self.done.set()


def engine_run(runtime, prompts: list[list[int]], adapters: list, new: int) -> tuple[float, list[Timeline]]:
    """Submit all requests at once; return tokens/s over the decode steps and each request's timeline."""
    from adapterd.server.engine import GenerationParams
    from adapterd.server.engine.observer import EngineObserver

    steps: list[tuple[int, float]] = []

    class Steps(EngineObserver):
        def decode_step(self, rows, seconds):
            steps.append((len(rows), seconds))

    observer = Steps()
    runtime.engine.observers.add(observer)
    params = GenerationParams(max_new_tokens=new, min_new_tokens=new)
    sinks = []
    # Hold the engine thread while submitting, so that every request is admitted in the same step and two
    # runs of the same requests see the same batch shapes.
    gate = threading.Event()
    runtime.engine.call(lambda: gate.wait(60))
    for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        sink = Timeline()
        runtime.engine.submit(f"b{time.perf_counter_ns()}-{i}", ids, params, adapter, sink)
        sinks.append(sink)
    gate.set()
    for s in sinks:
        s.done.wait(600)
    runtime.engine.observers.observers.remove(observer)
    # The median step with every row present: robust to the first steps' warm-up and to host-side jitter.
    full = [s for n, s in steps if n == len(prompts)]
    return len(prompts) / statistics.median(full), sinks
