"""Captured CUDA graphs, one per input shape, least recently used dropped first.

A graph bakes in the addresses of every tensor it touches. Callers name the storage those addresses live in
(``addresses``: e.g. the key/value pool's generation and the LoRA tables' wrap count); when it changes, every
graph is stale and dropped. Graphs of one cache share a memory pool: they never run at once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)

# A daemon that runs for weeks meets many shapes (thousands at a 4k context), and each graph holds host
# memory for its nodes.
MAX_GRAPHS = 256


class GraphCache:
    def __init__(self, name: str, max_graphs: int = MAX_GRAPHS) -> None:
        self.name = name
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = OrderedDict()
        self._pool: Any = None
        self._addresses: Hashable = None
        self.captures = 0  # graphs captured since start
        self.capture_seconds = 0.0  # wall time spent capturing them (warm-up forwards included)

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[Hashable]:
        return list(self._graphs)

    def entry(self, key: Hashable) -> tuple[torch.cuda.CUDAGraph, Any] | None:
        return self._graphs.get(key)

    def get(self, key: Hashable, addresses: Hashable,
            capture: Callable[[Hashable], tuple[torch.cuda.CUDAGraph, Any]]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """The graph for ``key`` and its outputs, captured by ``capture(key)`` the first time."""
        if addresses != self._addresses:  # storage moved: every baked-in address is stale
            self.clear()
            self._addresses = addresses
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # its share of the memory pool is reused by the others
            started = time.perf_counter()
            entry = capture(key)
            seconds = time.perf_counter() - started
            self._graphs[key] = entry
            self.captures += 1
            self.capture_seconds += seconds
            # Every running request waited this long: a latency spike an operator can match to this line.
            log.info("captured a %s CUDA graph for shape %s in %.0f ms (%d held)", self.name, key, seconds * 1000,
                     len(self._graphs))
        self._graphs.move_to_end(key)
        return entry

    def capture(self, forward: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Warm ``forward`` up on a side stream (lazy initialisation, cuBLAS workspaces and kernel tuning must
        not happen inside the capture), then capture one call of it into this cache's memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = forward()
        self._pool = graph.pool()
        return graph, outputs

    def clear(self) -> None:
        # The shared memory pool dies with its last graph: a later capture must start a new one.
        self._graphs.clear()
        self._pool = None
