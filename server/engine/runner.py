"""The runner: the model side of each step, as plain calls that the engine's loop makes.

It owns what lives on the device for the running batch: the LoRA slot table (slot activation and release), the
key/value pool and the running batch packed in it, the prefill and decode forwards (eager, or replayed from
CUDA graphs: ``prefill_step.py``, ``decode_step.py``, ``graphs.py``), and the kernel swaps made at start-up
(``swaps.py``). It returns logits and moves rows' positions; choosing tokens is the sampler's (``sampling.py``),
who joins is the scheduler's (``scheduler.py``), what the caller is told is the engine's and the output stage's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.lora_slots import LoraSlotTable
from ..adapters.prefix import PrefixWeights
from ..model import BaseModel
from .batch import Row, RunningBatch
from .decode_step import DecodeOutput, DecodeStep
from .decoder import Decoder, model_forward
from .kv_pool import KvPool
from .prefill_step import PrefillStep
from .step_tuning import tune_one_row_tiles
from .swaps import use_fused_norms, use_int8_kernel

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """What a prefill gives back: the last position's logits of each row, and for a shape the pool could not
    take at once, the transient cache and mask its rows join from (``join``)."""

    logits: torch.Tensor
    cache: Any = None
    mask: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, base: BaseModel, config: Any) -> None:
        self.int8_kernel_layers = use_int8_kernel(base, config.int8_kernel, config.max_batch_size)
        self.fused_norms = use_fused_norms(base, config.fused_kernels)
        # The BGMV kernels for LoRA in decode steps (GPU), chosen here once for the device.
        self.slots = LoraSlotTable(base.model, config.lora_slots, config.max_lora_rank, base.dtype, base.device,
                                   use_kernel=config.fused_kernels)
        self.pool = KvPool(base.num_layers, base.num_kv_heads, base.head_dim, base.dtype, base.device,
                           max_rows=config.max_batch_size, max_capacity=base.max_sequence_length)
        self.batch = RunningBatch(self.pool)
        self.forward = model_forward(base, config.own_decoder, config.max_batch_size,  # ours, or transformers'
                                     config.fused_kernels)
        self.own_decoder = isinstance(self.forward, Decoder)
        log.info("decoder forward: %s", "own" if self.own_decoder else "transformers'")
        self.decoder = DecodeStep(base, self.pool, self.slots, self.forward, config.max_batch_size,
                                  config.cuda_graphs, fused_pick=config.fused_kernels)
        self.prefiller = PrefillStep(base, self.pool, self.slots, self.forward, config.cuda_graphs)
        if config.step_tuning:  # before any request: it captures and drops one-row graphs (step_tuning.py)
            tune_one_row_tiles(self.decoder)
        self._evict_later: set[str] = set()  # unloaded adapters whose slot a running row still pins

    # ------------------------------------------------------------------ LoRA slots

    def activate(self, rows: list[Row]) -> None:
        """Pin a slot for each row's LoRA adapter, adapters already resident first (so that a new one evicts
        none of them); a row that gets none keeps slot 0 and stays queued."""
        for row in sorted((r for r in rows if r.lora_key and not r.slot),  # a slot kept from a failed step
                          key=lambda r: not self.slots.resident(r.lora_key)):
            row.slot = self.slots.acquire(row.lora_key, row.adapter.lora) or 0

    def release(self, row: Row) -> None:
        """Give back the row's slot, evicting its adapter if it was unloaded meanwhile."""
        if not row.slot:
            return
        self.slots.release(row.slot)
        key = row.lora_key
        if key in self._evict_later and self.slots.evict(key):
            self._evict_later.discard(key)
        row.slot = 0

    def evict(self, key: str) -> None:
        """Free an unloaded adapter's slot now, or when the last row using it leaves."""
        if not self.slots.evict(key):
            self._evict_later.add(key)

    # ------------------------------------------------------------------ forwards

    def prefill(self, rows: list[Row]) -> Prefilled:
        """Prefill ``rows`` (joining after the running batch) and set their positions. Straight into their pool
        rows when the padded shape fits the pool; else through a transient cache (``join`` moves them in)."""
        prompts = [r.prompt_ids for r in rows]
        prefixes: list[PrefixWeights | None] = [r.adapter.prefix if r.num_virtual_tokens else None for r in rows]
        slots = [r.slot for r in rows]
        first = len(self.batch)
        if self.prefiller.fits(first, prompts, prefixes):
            logits = self.prefiller.run(first, prompts, slots, prefixes)
            for row in rows:
                row.kv_len = row.next_position = row.num_virtual_tokens + len(row.prompt_ids)
            return Prefilled(logits)
        logits, cache, mask, next_positions = self.prefiller.through_cache(prompts, prefixes, slots)
        for row, position in zip(rows, next_positions, strict=True):
            row.next_position = position
        return Prefilled(logits, cache, mask)

    def discard_prefill(self) -> None:
        """A prefill failed: zero what it wrote into the pool rows past the running batch's (NaN included), so
        that the rows admitted there next read nothing of it."""
        for row in range(len(self.batch), self.pool.rows):
            self.pool.release(row)

    def join(self, rows: list[Row], prefilled: Prefilled, live: list[int]) -> None:
        """Add the prefilled rows at ``live`` (indices into ``rows``) to the running batch, after its rows.
        Straight into the pool, every row is in its pool row already: all join (the engine retires those that
        finished at their first token)."""
        if prefilled.cache is None:
            self.batch.rows.extend(rows)
        elif live:
            self.batch.join(rows, prefilled.cache, prefilled.mask, live)

    def reserve_decode(self) -> None:
        """Grow the pool for the next decode step now (``decode`` would), so that a failure can be told apart."""
        self.pool.reserve(*self.decoder.room([r.kv_len for r in self.batch.rows]))

    def rows_past_capacity(self) -> list[int]:
        """Running rows whose next step needs more entries than the pool has."""
        return [i for i, r in enumerate(self.batch.rows) if self.decoder.entries_for(r.kv_len) > self.pool.capacity]

    def graph_captures(self) -> tuple[int, float]:
        """CUDA graphs captured since start (decode and prefill) and the seconds their captures took."""
        caches = (self.decoder.graphs, self.prefiller.graphs)
        return sum(c.captures for c in caches), sum(c.capture_seconds for c in caches)

    def decode(self, tokens: torch.Tensor | None = None, eos_bans: Sequence[int] | None = None) -> DecodeOutput:
        """One decode step for every running row: each row's next logits (and greedy picks, end-of-sequence ids
        banned where ``eos_bans`` says: ``BatchSampler.eos_bans``); positions advance by one. The rows feed their
        ``last_token``, or ``tokens`` (on the device, one a row: the step before's, not yet read by the host)."""
        rows = self.batch.rows
        fed = [r.last_token for r in rows] if tokens is None else tokens
        out = self.decoder.run(fed, [r.next_position for r in rows], [r.kv_len for r in rows],
                               [r.slot for r in rows], eos_bans)
        for row in rows:
            row.next_position += 1
            row.kv_len += 1
        return out

    def keep(self, indices: list[int]) -> None:
        """Keep only the running rows at ``indices`` (the rest left the batch)."""
        self.batch.keep(indices)

    def clear(self, release: bool) -> None:
        """Empty the batch after a failed step; ``release=False`` when the device failed (nothing touched)."""
        self.batch.clear(release=release)
