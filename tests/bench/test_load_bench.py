"""load_bench: the one-adapter and the Zipf phase of a rate offer the same requests; the streams count only the
tokens that arrive within the common window."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other as top-level modules

from load_bench import StartSignal, arrival_plan, window_tokens  # noqa: E402


def test_both_phases_offer_the_same_requests_at_the_same_times():
    ids = [f"a{i}" for i in range(1000)]
    one, many = arrival_plan(1, 8.0, 10.0, ids, False), arrival_plan(1, 8.0, 10.0, ids, True)
    assert [(t, p) for t, p, _ in one] == [(t, p) for t, p, _ in many]
    assert 50 < len(one) < 110 and all(t < 10.0 for t, _, _ in one)  # ~80 arrivals at 8/s over 10 s
    assert {a for _, _, a in one} == {"a0"}
    zipf = [a for _, _, a in many]
    assert len(set(zipf)) > 10 and zipf.count("a0") > zipf.count("a1")  # Zipf: many ids, the head most often
    assert arrival_plan(2, 8.0, 10.0, ids, False) != one


def test_a_stream_counts_the_tokens_that_arrive_within_the_window_only():
    now = time.perf_counter()
    counted, total = window_tokens(3, 0, 10, stop=now + 60)  # a message with 3 tokens so far, in the window
    assert (counted, total) == (3, 13)
    counted, total = window_tokens(3, counted, total, stop=now + 60)  # nothing new (a text-only message)
    assert (counted, total) == (3, 13)
    counted, total = window_tokens(5, counted, total, stop=now - 1)  # 2 more, after the window closed
    assert (counted, total) == (5, 13)


def _wait_for_start(start: StartSignal, out: mp.Queue) -> None:
    stop = asyncio.run(start.wait(0.25))
    out.put((time.time(), stop - time.perf_counter()))


def test_client_processes_start_together_once_all_are_ready():
    ctx = mp.get_context("spawn")
    start, out = StartSignal(ctx), ctx.Queue()
    procs = [ctx.Process(target=_wait_for_start, args=(start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    ready = [start.ready.get(timeout=60) for _ in procs]  # each says so once it is up, then waits
    assert sorted(ready) == sorted(p.pid for p in procs) and out.empty()
    start.release(delay=0.5)
    began = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    starts = [t for t, _ in began]
    assert max(starts) - min(starts) < 0.2  # one start for all, whenever each process came up
    assert all(0.2 < left <= 0.25 for _, left in began)  # each window ends 0.25 s after that start
