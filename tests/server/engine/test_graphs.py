"""The cache of captured graphs, without a GPU: capture is replaced by a recorder."""

from __future__ import annotations

from adapterd.server.engine.graphs import GraphCache


def test_graphs_are_kept_per_shape_least_recently_used_out():
    cache = GraphCache("test", max_graphs=2)
    captured = []

    def capture(key):
        captured.append(key)
        return f"graph{key}", None

    assert cache.get((1, 128, 0), (1, 0), capture)[0] == "graph(1, 128, 0)"
    cache.get((1, 128, 0), (1, 0), capture)
    cache.get((2, 128, 0), (1, 0), capture)
    cache.get((1, 128, 0), (1, 0), capture)  # used again: now the most recent
    cache.get((4, 256, 16), (1, 0), capture)  # a third shape: the least recently used (2, 128, 0) goes
    assert cache.keys() == [(1, 128, 0), (4, 256, 16)]
    assert captured == [(1, 128, 0), (2, 128, 0), (4, 256, 16)] and cache.captures == 3
    cache.get((1, 128, 0), (2, 0), capture)  # the storage moved: every graph is stale
    assert captured[-1] == (1, 128, 0) and cache.keys() == [(1, 128, 0)]


def test_capture_time_is_counted_for_captures_only_and_each_capture_is_logged(caplog):
    """The step line's "graph captures (ms)" and adapterd_cuda_graph_capture_seconds: the time inside captures,
    not a lookup's; each capture says its shape and time in the log (a latency spike to match it with)."""
    import logging
    import time

    caplog.set_level(logging.INFO, "adapterd.server.engine.graphs")
    cache = GraphCache("test")

    def slow_capture(key):
        time.sleep(0.05)
        return "graph", None

    cache.get(1, 0, slow_capture)
    cache.get(1, 0, slow_capture)  # found: no capture, no time
    assert cache.captures == 1 and 0.05 <= cache.capture_seconds < 0.5
    (record,) = [r for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert record.getMessage().startswith("captured a test CUDA graph for shape 1 in ")
