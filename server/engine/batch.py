"""The running batch: its rows, each living in one row of the static key/value pool.

Row ``i`` of the batch is pool row ``i``; its ``kv_len`` entries are, left to right, the prefix adapter's
virtual tokens (if any), the prompt, then the generated tokens. Freshly prefilled rows join by copying their
live entries out of the prefill's left-padded cache; a row that leaves is replaced by the last row, so the
batch stays packed at the front of the pool and a decode step reads only live rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..adapters.store import LoadedAdapter
from .kv_pool import KvPool
from .request import GenerationEvent, GenerationParams, StopReason
from .sampling import RowSampler


@dataclass
class Row:
    """One request, from admission to retirement."""

    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    adapter: LoadedAdapter | None
    sink: Any  # Callable[[GenerationEvent], None], called on the engine thread
    sampler: RowSampler
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    passed_over: int = 0  # steps in which a request behind it was admitted while it waited (scheduler.py)
    slot: int = 0  # LoRA slot; 0 = none
    next_position: int = 0  # position id of the next token fed
    kv_len: int = 0  # key/value entries the row holds in the pool (virtual tokens, prompt, generated)
    last_token: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: StopReason = StopReason.NOT_FINISHED
    error: Exception | None = None  # why a row that ended with ERROR alone did (reported to its caller)

    @property
    def num_virtual_tokens(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter else 0

    @property
    def lora_key(self) -> str | None:
        return self.adapter.key if self.adapter is not None and self.adapter.lora is not None else None

    def emit(self, event: GenerationEvent) -> None:
        self.sink(event)


class RunningBatch:
    def __init__(self, pool: KvPool) -> None:
        self.rows: list[Row] = []
        self.pool = pool

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> None:
        """Add the prefilled ``rows[i]`` for i in ``keep``: cache row i holds its left-padded entries and
        ``mask[i]`` marks the live ones."""
        live = {i: mask[i].nonzero().flatten() for i in keep}
        first = len(self.rows)
        self.pool.reserve(first + len(keep), max(len(index) for index in live.values()) + 1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for n, i in enumerate(keep):
            index = live[i]
            self.pool.put(first + n, [(k[i].index_select(1, index), v[i].index_select(1, index)) for k, v in layers])
            rows[i].kv_len = len(index)
            self.rows.append(rows[i])

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices; each hole is filled by the batch's last row."""
        gone = sorted(set(range(len(self.rows))) - set(keep), reverse=True)
        for i in gone:
            last = len(self.rows) - 1
            if i != last:
                self.pool.move(last, i, self.rows[last].kv_len)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.pool.release(last)  # what the row left (perhaps non-finite) is never read by the next owner

    def clear(self, release: bool = True) -> None:
        """Drop every row and zero the whole pool (rows being prefilled when a step failed wrote there too);
        ``release=False`` leaves the pool untouched (the device failed: nothing runs on it any more)."""
        if release:
            for i in range(self.pool.rows):
                self.pool.release(i)
        self.rows = []
