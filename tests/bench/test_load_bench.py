"""load_bench: the one-adapter and the Zipf phase of a rate offer the same requests; the streams count only the
tokens that arrive within the common window."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other as top-level modules

from load_bench import StartSignal, record, window_tokens  # noqa: E402
from zipf_load import arrival_plan, describe_phase, histogram_totals  # noqa: E402


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


def test_a_phase_is_split_by_the_daemons_own_histograms(tmp_path):
    """The Zipf sweep's breakdown: loads, queue time and first tokens between two readings of /metrics (summed
    over label sets, as the daemon labels them by adapter), a histogram with no new requests said as 0."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    loads = Histogram("adapterd_adapter_load_seconds", "", ["adapter_type"], registry=registry)
    queue = Histogram("adapterd_request_queue_time_seconds", "", registry=registry)
    Histogram("adapterd_time_to_first_token_seconds", "", registry=registry)
    exposition = tmp_path / "metrics.txt"

    def reading() -> dict[str, tuple[float, float]]:
        exposition.write_bytes(generate_latest(registry))
        return histogram_totals(exposition.as_uri())

    before = reading()
    loads.labels("lora").observe(0.030)
    loads.labels("prefix").observe(0.050)
    queue.observe(0.002)
    assert describe_phase(before, reading()) == "2 adapter loads (mean 40.0 ms), 1 queue (mean 2.0 ms), 0 first token"


def test_a_run_without_the_zipf_sweep_records_no_empty_table(tmp_path):
    """``--rates ''`` (TTFT or streams alone, as the device calls of 2026-12-02 ran): the block says there was no
    sweep instead of a table header with no rows; with a sweep, the table and its rows."""
    import torch

    args = argparse.Namespace(shape="tiny", adapters=20, distinct=2, rank=16, slots=4, zipf_duration=2.0, new=8,
                              quantization="none", client_procs=1, http=False)
    results = tmp_path / "RESULTS.md"
    record(args, [], ["time to first token: ..."], torch.device("cpu"), 1, results)
    text = results.read_text()
    assert "No Zipf sweep in this run" in text and "| rate |" not in text and "- time to first token" in text
    record(args, ["| 8/s | 1 | 2 | 3 / 4 | 1 | 2 | 3 / 4 | 1.00 | 1.00 |"], [], torch.device("cpu"), 1, results)
    assert text.count("### load_bench") == 1 and results.read_text().count("| rate |") == 1
    assert "| 8/s | 1 |" in results.read_text()
