"""The running batch: its rows and their key/value cache, left-padded to one length.

Each row's cache holds, left to right: padding, the prefix adapter's virtual tokens (if any), the prompt,
then the generated tokens. ``mask`` is 1 where a position is real. Rows join (after their own prefill) by
padding the shorter side on the left; rows leave by index selection; columns that are padding in every row
are cut off, so the batch never attends over more than its longest live row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from adapterd.server.adapters.store import LoadedAdapter
from adapterd.server.engine.request import GenerationEvent, GenerationParams, StopReason
from adapterd.server.engine.sampling import RowSampler
from adapterd.server.engine.text import TextStream


@dataclass
class Row:
    """One request, from admission to retirement."""

    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    adapter: LoadedAdapter | None
    sink: Any  # Callable[[GenerationEvent], None], called on the engine thread
    sampler: RowSampler
    text: TextStream
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    slot: int = 0  # LoRA slot; 0 = none
    next_position: int = 0  # position id of the next token fed
    last_token: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: StopReason = StopReason.NOT_FINISHED

    @property
    def num_virtual_tokens(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter else 0

    @property
    def lora_key(self) -> str | None:
        return self.adapter.key if self.adapter is not None and self.adapter.lora is not None else None

    def emit(self, event: GenerationEvent) -> None:
        self.sink(event)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L], long

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows with their own cache and mask."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        merged = []
        for (k0, v0), (k1, v1) in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            merged.append((torch.cat([_pad_left(k0, length, 2), _pad_left(k1, length, 2)]),
                           torch.cat([_pad_left(v0, length, 2), _pad_left(v1, length, 2)])))
        self.cache = build_cache(merged)
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
        self.rows.extend(rows)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices, then cut columns that no row uses any more."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask.index_select(0, index)
        first_live = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, first_live:]
        self.cache = build_cache([(k.index_select(0, index)[:, :, first_live:],
                                   v.index_select(0, index)[:, :, first_live:])
                                  for k, v in cache_layers(self.cache)])
