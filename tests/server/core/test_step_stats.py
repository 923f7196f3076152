"""The engine core's step counts (its ``steps`` call): what bench/load_bench.py compares with the engine driven
in-process, so they must count exactly the forwards the engine ran for a request."""

from __future__ import annotations

import msgspec
import pytest

from adapterd.server.core.step_stats import StepCounts

# The module's ``daemon`` is the session's shared one (tests/server/conftest.py): its tests only send requests.
READS_ONLY = True


def _steps(daemon) -> StepCounts:
    return msgspec.convert(daemon.run(daemon.daemon.state.runtime.call("steps")), StepCounts)


def test_one_request_is_one_prefill_and_a_decode_step_per_further_token(daemon, client):
    before = _steps(daemon)
    reply = client.generate("hello world", max_new_tokens=5, min_new_tokens=5)
    counts = _steps(daemon).minus(before)
    assert reply.generated_token_count == 5
    # The prefill samples the first token; each of the other four comes from a decode step of one row.
    assert (counts.prefills, counts.prefill_rows, counts.decode_steps, counts.decode_rows) == (1, 1, 4, 4)
    assert counts.prefill_seconds > counts.prefill_launch_seconds > 0 and counts.decode_seconds > 0
    assert 0 < counts.decode_launch_seconds < counts.decode_seconds
    assert counts.graph_captures == 0 and counts.capture_seconds == 0  # the runner's counts: no graphs on a CPU
    # Four steps back to back: three gaps between them, all busy; the thread's CPU time never exceeds the wall.
    assert counts.busy_wall_seconds > 0 and 0 < counts.busy_cpu_seconds <= counts.busy_wall_seconds * 1.01


def test_a_phase_is_described_per_step_and_per_prefill():
    counts = StepCounts(decode_steps=10, decode_rows=80, decode_seconds=0.05, prefills=4, prefill_rows=6,
                        prefill_seconds=0.02, prefill_launch_seconds=0.006).minus(
        StepCounts(decode_steps=2, decode_rows=16, decode_seconds=0.01))
    assert counts.describe(span=0.4) == ("8 decode steps (50.00 ms apart), 8.0 rows and 5.00 ms each; 4 prefills "
                                         "(0.50 per decode step), 1.5 rows and 5.00 ms each (1.50 ms of it to build "
                                         "and launch)")
    assert StepCounts().describe(1.0) == "no decode steps"
    timed = StepCounts(decode_steps=4, decode_rows=4, decode_seconds=0.04, decode_launch_seconds=0.008,
                       busy_wall_seconds=0.05, busy_cpu_seconds=0.04)
    assert timed.describe(span=0.1) == ("4 decode steps (25.00 ms apart), 1.0 rows and 10.00 ms each; decode launch "
                                        "2.00 ms a step; engine thread on a CPU 80% of the time")
    captured = StepCounts(decode_steps=1, decode_rows=2, decode_seconds=0.01, graph_captures=3, capture_seconds=0.25)
    assert captured.describe(span=1.0).endswith("; 3 graph captures (250 ms)")


def test_prefill_times_are_each_prefill_one_by_one(daemon, client):
    """The ``prefill_times`` call: the latest prefills' seconds one by one, oldest first, summing to what the
    counts add up (load_bench takes a TTFT run's median from them)."""
    before = _steps(daemon)
    for prompt in ("one", "two words", "and three words"):
        client.generate(prompt, max_new_tokens=1)
    counts = _steps(daemon).minus(before)
    times = daemon.run(daemon.daemon.state.runtime.call("prefill_times", "3"))
    assert len(times) == counts.prefills == 3 and all(t > 0 for t in times)
    assert sum(times) == pytest.approx(counts.prefill_seconds, rel=1e-6)
    assert daemon.run(daemon.daemon.state.runtime.call("prefill_times", "1")) == times[-1:]
    assert daemon.run(daemon.daemon.state.runtime.call("prefill_times", "0")) == []
