"""Static per-row key/value storage for the decode step.

Every layer owns ``keys`` and ``values`` of shape ``[rows, kv_heads, capacity, head_dim]``. Running row ``i``
of the batch lives in pool row ``i`` and holds its entries left-aligned: the prefix adapter's virtual
tokens (if any), the prompt, then the generated tokens. A decode step writes each row's new key/value at
that row's own length (``write_pos``, a device tensor), and attention reads ``[:batch, :, :length]`` with a
mask that hides everything at or past each row's length (and, in sliding-window layers, every entry a window
or more behind: entries are positions, so the pool keeps all a window needs and the mask does the rest).
Nothing is concatenated or re-allocated per step, so the step has fixed shapes and addresses and can be
captured in a CUDA graph (see ``decode_step.py``).

The pool is storage; what one forward reads and writes is a view of it (``decode_view``, ``prefill_view``):
a transformers ``Cache`` built by the step for that forward, held in its ``StepContext`` and handed to the
model as its cache, so no forward can see another's view.

Attention reads past each row's own entries (masked), and a masked probability is an exact 0 that still
multiplies the value read (0 x NaN = NaN): so no row may ever read an entry another row left behind. The pool
keeps, per row, how far forwards may have written (``used``), and zeroes what a new owner does not own: a
row that leaves is zeroed, a row moved or put into another keeps nothing of the old one past its own entries.

All of it is one tensor, ``storage`` ``[2, layers, rows, kv_heads, capacity, head_dim]`` (keys, then values);
``keys[layer]`` and ``values[layer]`` are views of it. So what touches one row in every layer (moving it,
zeroing it, putting a prefix in) is one operation, not one per layer and tensor: a 7B model's 32 layers made
it 64 launches (and their Python) for each row that left the batch, at every step where one did.

Rows leave by moving the last row into the hole (one copy of its entries, all layers at once). Storage grows by
doubling, rows up to the batch limit and capacity up to the model's context, so memory follows the longest
live row the way a padded dynamic cache would; growing re-allocates, which invalidates captured graphs
(``generation`` counts re-allocations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

if TYPE_CHECKING:
    from ..kernels.rope_append import QkvDeltas


def _grown(size: int, needed: int, limit: int) -> int:
    while size < needed:
        size *= 2
    return min(max(size, needed), limit)


class KvPool:
    """Static per-row key/value storage; a forward reads and writes it through a view (``decode_view``,
    ``prefill_view``)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_rows: int, max_capacity: int, rows: int = 4, capacity: int = 256) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_rows, self.max_capacity = max_rows, max_capacity
        self.storage = torch.empty(0)  # [2, layers, rows, kv_heads, capacity, head_dim]
        self.keys: list[torch.Tensor] = []  # views of storage[0], one per layer
        self.values: list[torch.Tensor] = []
        self.generation = 0  # bumped at every re-allocation: captured graphs must be dropped
        self.used: list[int] = []  # per pool row: entries a forward may have written since it was last zeroed
        self._allocate(min(rows, max_rows), min(capacity, max_capacity))

    # ------------------------------------------------------------------ storage

    @property
    def rows(self) -> int:
        return self.storage.shape[2]

    @property
    def capacity(self) -> int:
        return self.storage.shape[4]

    def _allocate(self, rows: int, capacity: int) -> None:
        """Storage of ``rows`` x ``capacity`` entries a layer, the live entries copied over. All or nothing: the
        new tensors are made and filled before any attribute changes, so an allocation that fails (out of
        memory while growing for one long prompt) leaves the pool as it was, and every other row serving."""
        shape = (2, self.num_layers, rows, self.kv_heads, capacity, self.head_dim)
        storage = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys:
            r, c = min(rows, self.rows), min(capacity, self.capacity)
            storage[:, :, :r, :, :c].copy_(self.storage[:, :, :r, :, :c])
        self.storage, self.keys, self.values = storage, list(storage[0].unbind(0)), list(storage[1].unbind(0))
        self.used = [min(n, capacity) for n in self.used[:rows]] + [0] * max(0, rows - len(self.used))
        self.generation += 1

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` entries each (doubling, within the limits)."""
        if rows > self.max_rows or length > self.max_capacity:
            raise ValueError(f"{rows} rows x {length} entries exceed the pool's limits "
                             f"({self.max_rows} x {self.max_capacity})")
        if rows > self.rows or length > self.capacity:
            self._allocate(_grown(self.rows, rows, self.max_rows), _grown(self.capacity, length, self.max_capacity))

    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    # ------------------------------------------------------------------ rows

    def put(self, row: int, layer_entries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store a prefilled row: per layer, keys and values ``[kv_heads, n, head_dim]``, left-aligned; the
        row keeps nothing of an earlier owner past them."""
        n = layer_entries[0][0].shape[1] if layer_entries else 0
        if n:
            for side, entries in enumerate(zip(*layer_entries, strict=True)):  # keys, then values
                self.storage[side, :, row, :, :n].copy_(torch.stack(entries))
        self._zero(row, n)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` entries into row ``dst`` (a row leaving fills its hole); ``dst``
        keeps nothing of its old owner past them."""
        self.storage[:, :, dst, :, :length].copy_(self.storage[:, :, src, :, :length])
        self._zero(dst, length)

    def release(self, row: int) -> None:
        """Row ``row`` has no owner any more: zero every entry a forward may have written into it."""
        self._zero(row, 0)

    def touch(self, first: int, rows: int, length: int) -> None:
        """The next forward may write entries ``0..length-1`` of rows ``first..first+rows-1`` (host-side
        bookkeeping, done before the forward, so that a replayed CUDA graph is counted too)."""
        for row in range(first, first + rows):
            self.used[row] = max(self.used[row], length)

    def _zero(self, row: int, start: int) -> None:
        """Zero entries ``start..used[row]-1`` of ``row``: the row's owner holds entries ``0..start-1`` only."""
        end = self.used[row]
        if end > start:
            self.storage[:, :, row, :, start:end].zero_()
        self.used[row] = start  # entries before ``start`` are the owner's own

    # ------------------------------------------------------------------ the forward's view

    def decode_view(self, batch: int, length: int, write_pos: torch.Tensor) -> DecodeView:
        """Decode: rows 0..batch-1 each write one entry at ``write_pos`` and attend over ``length`` entries."""
        return DecodeView(self, batch, length, write_pos)

    def prefill_view(self, rows: torch.Tensor, index: torch.Tensor, prefix: int = 0) -> PrefillView:
        """Prefill: token t of row i goes to entry ``index[i, t]`` of pool row ``rows[i]``, and attention runs
        over each row's first ``prefix`` entries (a prefix adapter's virtual tokens, put there beforehand;
        the mask hides those past a row's own prefix) followed by the prompt's own keys."""
        return PrefillView(self, rows, index, prefix)


class _PoolView(Cache):
    """One forward's view of a ``KvPool``: a transformers ``Cache`` whose ``update`` writes into the pool."""

    def __init__(self, pool: KvPool, length: int) -> None:
        # Cache's own constructor wants per-layer objects; this class replaces them, so it is not called.
        self.layers: list[Any] = []
        self.pool = pool
        self.length = length  # key/value entries the forward's attention reads per row

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only consulted when position ids are missing
        return self.length

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.length, 0

    @property
    def is_compileable(self) -> bool:
        return True


class DecodeView(_PoolView):
    """Rows 0..batch-1, one new token each, written at ``write_pos`` ([batch] long, the entry each row writes
    next); attention reads each row's first ``length`` entries."""

    def __init__(self, pool: KvPool, batch: int, length: int, write_pos: torch.Tensor) -> None:
        super().__init__(pool, length)
        self.batch, self.write_pos = batch, write_pos

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per row at its own position; return the rows' entries up to ``length``."""
        k, v = self.layer(layer_idx)
        rows = torch.arange(self.batch, device=key_states.device)
        k[rows, :, self.write_pos] = key_states[:, :, 0].to(k.dtype)
        v[rows, :, self.write_pos] = value_states[:, :, 0].to(v.dtype)
        return self.read(layer_idx)

    def append_rotated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layer_idx: int, lora: QkvDeltas | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``update`` with the rotary embedding before it, in one kernel (``kernels/rope_append.py``; its ``fits``
        must hold): q, k, v as split from the projection (``[batch, 1, heads, head_dim]``, not yet rotated), and
        ``lora``, their LoRA deltas still to add (added first, by the same kernel).
        Returns the rotated query ``[batch, q_heads, 1, head_dim]`` and what attention reads, as ``update``."""
        from ..kernels.rope_append import rope_append

        keys, values = self.layer(layer_idx)
        q = rope_append(q, k, v, cos, sin, keys, values, self.write_pos, lora)
        return q, *self.read(layer_idx)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's keys and values of a layer, whole (``[rows, kv_heads, capacity, head_dim]``): where a kernel
        writes this step's entries itself (at ``write_pos``), before ``read``."""
        return self.pool.keys[layer_idx], self.pool.values[layer_idx]

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads of a layer once this step's entries are written: the rows' first ``length``."""
        keys, values = self.layer(layer_idx)
        return keys[: self.batch, :, : self.length], values[: self.batch, :, : self.length]


class PrefillView(_PoolView):
    """Pool rows ``rows`` ([n] long) being prefilled, token t of row i written at entry ``index[i, t]``
    ([n, T] long); attention reads the first ``prefix`` entries of each row, then the prompt's own keys."""

    def __init__(self, pool: KvPool, rows: torch.Tensor, index: torch.Tensor, prefix: int) -> None:
        super().__init__(pool, prefix + index.shape[1])
        self.rows, self.index, self.prefix = rows, index, prefix

    def get_seq_length(self, layer_idx: int = 0) -> int:  # entries before the prompt's (position ids are given)
        return self.prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write every token where ``index`` says; return the prefix's entries and the prompt's own keys and
        values."""
        k, v = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        if self.prefix:  # read before this forward's writes: [n, heads, prefix, dim]
            prefix_k = k[self.rows, :, : self.prefix].to(key_states.dtype)
            prefix_v = v[self.rows, :, : self.prefix].to(value_states.dtype)
        rows = self.rows[:, None]
        k[rows, :, self.index] = key_states.transpose(1, 2).to(k.dtype)  # [n, T, heads, dim]
        v[rows, :, self.index] = value_states.transpose(1, 2).to(v.dtype)
        if self.prefix:
            return torch.cat([prefix_k, key_states], dim=2), torch.cat([prefix_v, value_states], dim=2)
        return key_states, value_states


def decode_mask(write_pos: torch.Tensor, length: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive attention mask ``[batch, 1, 1, length]``: row b sees entries 0..write_pos[b] (its new token
    included), and with a sliding ``window`` only those less than ``window`` positions back (entries are
    positions: a row's prefix, prompt and generated tokens sit left-aligned from entry 0)."""
    entry = torch.arange(length, device=write_pos.device)[None, :]
    visible = entry <= write_pos[:, None]
    if window is not None:
        visible &= write_pos[:, None] - entry < window
    return _additive(visible[:, None, None, :], dtype)


def causal_mask(live: torch.Tensor, queries: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive causal mask ``[rows, 1, queries, K]`` over key columns of which ``live`` ``[rows, K]`` (bool)
    marks the real entries, in order; the queries are the last ``queries`` columns. A column's position is the
    number of live columns before it (so padding anywhere shifts nothing, and a prefix's virtual tokens count
    first, as in PEFT); a query sees the live columns up to its own, and with a sliding ``window`` only those
    less than ``window`` positions back (transformers' ``sliding_window_overlay``). A padding query sees only
    itself, so that its softmax stays finite. Device ops only, no host sync: safe inside a CUDA graph."""
    k = live.shape[1]
    column = torch.arange(k, device=live.device)
    query_column = column[k - queries:]
    visible = live[:, None, :] & (column[None, None, :] <= query_column[None, :, None])
    if window is not None:
        position = live.long().cumsum(1) - 1
        visible &= position[:, k - queries:, None] - position[:, None, :] < window
    itself = (column[None, :] == query_column[:, None])[None]
    visible = torch.where(live[:, k - queries:, None], visible, itself)
    return _additive(visible[:, None], dtype)


def prefill_mask(pads: torch.Tensor, length: int, dtype: torch.dtype, virtual: torch.Tensor | None = None,
                 prefix: int = 0, window: int | None = None) -> torch.Tensor:
    """Additive causal mask ``[rows, 1, length, prefix + length]`` for left-padded prompts: token t of row i
    sees its row's first ``virtual[i]`` prefix entries (of ``prefix`` columns) and tokens pads[i]..t, within
    the ``window`` if any (see ``causal_mask``)."""
    live = torch.arange(length, device=pads.device)[None, :] >= pads[:, None]
    if prefix:
        live = torch.cat([torch.arange(prefix, device=pads.device)[None, :] < virtual[:, None], live], dim=1)
    return causal_mask(live, length, dtype, window)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, else the minimum finite value (not -inf: a padding row that sees nothing stays finite)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)
