"""One decode forward for every running row: eager, or replayed from a CUDA graph.

An eager decode step of a 7B model is bound by the host: ~20 kernel launches per layer, each behind Python
in transformers' forward, take 60-100 ms where the GPU needs 3-4 ms (bench/NOTES.md). On CUDA the step is
therefore captured once per shape and replayed: the shape is (batch bucket, key/value length bucket, LoRA
rank bucket), every input lives in a static device buffer that is refreshed before each replay, and the
key/value storage is the static ``KvPool``. Rows beyond the live batch in a bucket are padding: they feed
the pad token at position 0, write into pool rows no live row uses, and use no adapter.

Graphs share one memory pool (they never run at once) and are captured lazily, the first time a shape is
seen; they are dropped when the pool re-allocates or a new layer gains LoRA tables, because both change
the addresses a graph has baked in. If capture fails (a kernel that synchronises with the host, say), the
step falls back to eager for good and says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..adapters.lora_slots import LoraSlotTable
from ..kernels import greedy_pick as greedy_kernel
from ..model import BaseModel
from .decoder import Forward
from .graphs import GraphCache
from .kv_pool import KvPool, decode_mask
from .sampling import logits_width
from .sampling_ops import greedy_pick
from .step_context import StepContext

log = logging.getLogger(__name__)

Tokens = Sequence[int] | torch.Tensor  # host ids, or the last step's sampled tokens on the device

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_GRAIN = 128  # key/value entries: attention reads at most this many padding columns per row


class DecodeOutput(NamedTuple):
    """One decode step's result for its n rows: ``logits`` ``[n, vocab]``, and ``greedy`` ``[n, 2]`` long, each
    row's argmax and finite flag (``sampling_ops.greedy_pick``), computed within the step (inside its CUDA graph),
    so that a batch of plain greedy rows launches nothing more to choose its tokens."""

    logits: torch.Tensor
    greedy: torch.Tensor


def batch_bucket(n: int, limit: int) -> int:
    return min(next((b for b in BATCH_BUCKETS if b >= n), n), limit)


def length_bucket(n: int, limit: int) -> int:
    return min(-(-n // LENGTH_GRAIN) * LENGTH_GRAIN, limit)


def power_bucket(n: int, smallest: int, limit: int) -> int:
    """The least power-of-two multiple of ``smallest`` that holds ``n``, at most ``limit``."""
    bucket = smallest
    while bucket < n:
        bucket *= 2
    return min(bucket, limit)


def rank_bucket(rank: int, limit: int) -> int:
    return power_bucket(rank, 8, limit) if rank > 0 else 0


class DecodeStep:
    """Feeds one token per row through the model and returns each row's next-token logits."""

    def __init__(self, base: BaseModel, pool: KvPool, slots: LoraSlotTable, forward: Forward, max_batch: int,
                 use_graphs: bool, fused_pick: bool = True) -> None:
        self.base, self.pool, self.slots, self.forward = base, pool, slots, forward
        self.max_batch = max_batch
        self.use_graphs = use_graphs and base.device.type == "cuda"
        # Pad to the graphs' bucketed shapes even when running eagerly: lets CPU tests check the padding.
        self.bucketed = False
        dev = base.device
        # Static inputs, refreshed before every replay: token, position id, write index, LoRA slot, and whether
        # the row's token may not be an end-of-sequence id (its minimum length: ``BatchSampler.eos_bans``).
        self._inputs = torch.zeros(5, max_batch, dtype=torch.long, device=dev)
        self.vocab = base.model.get_input_embeddings().num_embeddings  # ids the embedding can look up
        width = logits_width(base.model)
        self.eos = torch.tensor(sorted(i for i in base.eos_token_ids if 0 <= i < width), dtype=torch.long).to(dev)
        self._pick = pick_kernel(dev, self.eos) if fused_pick else None
        self.graphs = GraphCache("decode")

    def run(self, tokens: Tokens, positions: Sequence[int], kv_lengths: Sequence[int],
            slots: Sequence[int], eos_bans: Sequence[int] | None = None) -> DecodeOutput:
        """Logits ``[n, vocab]`` and greedy picks for n rows; row i writes its new entry at ``kv_lengths[i]``.
        ``tokens``: host ids, or the previous step's sampled tokens still on the device (the engine runs a step
        ahead of its host: engine.py), which are never waited for here. ``eos_bans``: 1 where row i's pick may
        not be an end-of-sequence id (none by default)."""
        n = len(tokens)
        eos_bans = [0] * n if eos_bans is None else eos_bans
        rank = self.slots.rank_of(slots)
        if not (self.use_graphs or self.bucketed):  # exact shapes
            return self._run_shape(tokens, positions, kv_lengths, slots, eos_bans, n, max(kv_lengths) + 1, rank)
        batch = batch_bucket(n, self.max_batch)
        length = length_bucket(max(kv_lengths) + 1, self.pool.max_capacity)
        rank = rank_bucket(rank, self.slots.max_rank)
        if not self.use_graphs:
            return _first(self._run_shape(tokens, positions, kv_lengths, slots, eos_bans, batch, length, rank), n)
        self._set_inputs(tokens, positions, kv_lengths, slots, eos_bans, batch, length)
        try:
            graph, outputs = self._graph(batch, length, rank)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # a kernel that cannot be captured: serve on, eagerly
            self.capture_failed(exc)
            return _first(self._run_shape(tokens, positions, kv_lengths, slots, eos_bans, batch, length, rank), n)
        graph.replay()
        return _first(outputs, n)

    def room(self, kv_lengths: Sequence[int]) -> tuple[int, int]:
        """The pool rows, and entries a row, that the next ``run`` over rows of these lengths reserves."""
        if not (self.use_graphs or self.bucketed):
            return len(kv_lengths), max(kv_lengths) + 1
        return batch_bucket(len(kv_lengths), self.max_batch), self.entries_for(max(kv_lengths))

    def entries_for(self, kv_length: int) -> int:
        """Pool entries a row of ``kv_length`` entries needs for the next step (its padded length bucket)."""
        if not (self.use_graphs or self.bucketed):
            return kv_length + 1
        return length_bucket(kv_length + 1, self.pool.max_capacity)

    def _set_inputs(self, tokens: Tokens, positions: Sequence[int], kv_lengths: Sequence[int],
                    slots: Sequence[int], eos_bans: Sequence[int], batch: int, length: int) -> None:
        """Copy the rows' inputs into the static buffers; rows n..batch-1 are padding. On a GPU the copy is
        queued from page-locked memory: it waits for no earlier work (a pageable one would wait for the step
        still running), and the host allocator keeps the block until the copy is done."""
        self.pool.reserve(batch, length)
        self.pool.touch(0, batch, length)
        n = len(tokens)
        pad = batch - n
        ids = [self.base.pad_token_id] * n if isinstance(tokens, torch.Tensor) else list(tokens)
        on_gpu = self._inputs.device.type == "cuda"
        host = torch.tensor([ids + [self.base.pad_token_id] * pad, list(positions) + [0] * pad,
                             list(kv_lengths) + [0] * pad, list(slots) + [0] * pad, list(eos_bans) + [0] * pad],
                            dtype=torch.long,
                            pin_memory=on_gpu)
        self._inputs[:, :batch].copy_(host, non_blocking=on_gpu)
        if isinstance(tokens, torch.Tensor):
            # -1 marks a row whose sampling failed (it ends when the host reads it): a valid id keeps the
            # embedding lookup in bounds for this step, whose output for that row is thrown away.
            torch.clamp(tokens, 0, self.vocab - 1, out=self._inputs[0, :n])

    def _run_shape(self, tokens: Tokens, positions: Sequence[int], kv_lengths: Sequence[int],
                   slots: Sequence[int], eos_bans: Sequence[int], batch: int, length: int, rank: int) -> DecodeOutput:
        self._set_inputs(tokens, positions, kv_lengths, slots, eos_bans, batch, length)
        return self._forward(batch, length, rank)

    def _forward(self, batch: int, length: int, rank: int) -> DecodeOutput:
        """The forward a graph captures: its context reads the static inputs, so a replay reads new ones."""
        ids, positions, write_pos, slots, bans = self._inputs[:, :batch]
        context = StepContext("decode", self.slots.rows_for(slots, rank, "decode"),
                              self.pool.decode_view(batch, length, write_pos))
        mask = self.base.attention.masks(lambda window: decode_mask(write_pos, length, self.base.dtype, window))
        logits = self.forward(ids[:, None], positions[:, None], mask, context)
        pick = self._pick if self._pick is not None and greedy_kernel.fits(logits, bans, self.eos) else greedy_pick
        return DecodeOutput(logits, pick(logits, bans, self.eos))

    # ------------------------------------------------------------------ CUDA graphs

    @property
    def captures(self) -> int:
        return self.graphs.captures

    def _graph(self, batch: int, length: int, rank: int) -> tuple[torch.cuda.CUDAGraph, DecodeOutput]:
        return self.graphs.get((batch, length, rank), (self.pool.generation, self.slots.wraps),
                               lambda key: self.graphs.capture(lambda: self._forward(*key)))

    def capture_failed(self, exc: BaseException) -> None:
        """A capture raised: decode eagerly from now on."""
        log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", exc)
        self.use_graphs = False
        self.graphs.clear()


def pick_kernel(device: torch.device, eos: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """``kernels/greedy_pick.py``'s one-launch pick where it runs on ``device`` and takes this many EOS ids,
    else None (``sampling_ops.greedy_pick``, four to eight torch kernels)."""
    if eos.numel() > greedy_kernel.MAX_EOS or not greedy_kernel.greedy_pick_available(device):
        return None
    return greedy_kernel.greedy_pick


def _first(output: DecodeOutput, n: int) -> DecodeOutput:
    """The first ``n`` rows of a step's output (the rest are the bucket's padding)."""
    return DecodeOutput(output.logits[:n], output.greedy[:n])
