"""The decode step's bookkeeping: shape buckets, and the cache of captured graphs (GPU behaviour itself is
checked by the parity suite on the device: ADAPTERD_TEST_DEVICE=cuda)."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

from adapterd.server.engine.decode_step import DecodeStep, batch_bucket, length_bucket, rank_bucket


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 3, 5, 13, 33, 64)] == [1, 4, 8, 16, 48, 64]
    assert batch_bucket(40, 32) == 32
    assert [length_bucket(n, 4096) for n in (1, 128, 129, 4095)] == [128, 128, 256, 4096]
    assert length_bucket(300, 200) == 200
    assert [rank_bucket(r, 64) for r in (0, 1, 8, 9, 16, 33)] == [0, 8, 8, 16, 16, 64]
    assert rank_bucket(40, 32) == 32


def test_graphs_are_kept_per_shape_least_recently_used_out(monkeypatch):
    """The graph cache without a GPU: capture is replaced by a recorder, the bookkeeping is what is tested."""
    pool = SimpleNamespace(generation=1)
    slots = SimpleNamespace(wraps=0)
    step = DecodeStep.__new__(DecodeStep)
    step.pool, step.slots, step.max_graphs = pool, slots, 2
    step._graphs, step._graph_pool, step._addresses = OrderedDict(), None, (1, 0)
    captured = []
    monkeypatch.setattr(step, "_capture", lambda b, n, r: captured.append((b, n, r)) or (f"g{b}{n}{r}", None))
    assert step._graph(1, 128, 0)[0] == "g11280" and step._graph(1, 128, 0)[0] == "g11280"
    step._graph(2, 128, 0)
    step._graph(1, 128, 0)  # used again: now the most recent
    step._graph(4, 256, 16)  # a third shape: the least recently used (2, 128, 0) goes
    assert list(step._graphs) == [(1, 128, 0), (4, 256, 16)]
    assert captured == [(1, 128, 0), (2, 128, 0), (4, 256, 16)]
    pool.generation = 2  # the pool moved: every graph is stale
    step._graph(1, 128, 0)
    assert captured[-1] == (1, 128, 0) and list(step._graphs) == [(1, 128, 0)]
