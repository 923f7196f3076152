"""load_bench's Poisson phases: the one-adapter and the Zipf phase of a rate offer the same requests."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench's modules import each other as top-level modules

from load_bench import arrival_plan  # noqa: E402


def test_both_phases_offer_the_same_requests_at_the_same_times():
    ids = [f"a{i}" for i in range(1000)]
    one, many = arrival_plan(1, 8.0, 10.0, ids, False), arrival_plan(1, 8.0, 10.0, ids, True)
    assert [(t, p) for t, p, _ in one] == [(t, p) for t, p, _ in many]
    assert 50 < len(one) < 110 and all(t < 10.0 for t, _, _ in one)  # ~80 arrivals at 8/s over 10 s
    assert {a for _, _, a in one} == {"a0"}
    zipf = [a for _, _, a in many]
    assert len(set(zipf)) > 10 and zipf.count("a0") > zipf.count("a1")  # Zipf: many ids, the head most often
    assert arrival_plan(2, 8.0, 10.0, ids, False) != one
