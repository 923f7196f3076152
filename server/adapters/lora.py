"""LoRA serving: the batched layer that serves many adapters in one forward, and the slot table behind it.

Every base linear that some loaded adapter targets is wrapped once in a ``BatchedLoraLinear``. It holds
the adapters' weights stacked in slots, rank-major: ``A: [R, slots, in]`` and ``B: [R, slots, out]`` (R, the
configured maximum rank; smaller ranks are zero-padded, which adds exact zeros), B already multiplied by the
adapter's scaling.
Before each forward the engine sets one slot index per batch row, and the layer adds each row's own
``scaling * (x @ A^T) @ B^T`` to the base output: the S-LoRA/Punica idea. A forward with few rows gathers
each row's A and B; one with many rows reads every slot once and keeps each row's own product (dense).
Slot 0 stays all zeros and means "no adapter", so base rows get exactly the base output.
A decode step (one token a row, at most 64 rows) on a GPU goes to the BGMV kernels of
``server/kernels/lora_bgmv.py`` instead: two launches a layer that read only the slots in use.
Parsing and checking the files is ``lora_weights.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..kernels import LORA_KERNEL_MAX_ROWS, lora_kernel_available
from .lora_weights import LoraModule, LoraWeights


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (int(inf), int(outf)) if inf is not None and outf is not None else None


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` for every linear-like layer of the base."""
    shapes = {}
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is not None and not isinstance(module, BatchedLoraLinear):
            shapes[name] = shape
    return shapes


class RowSlots:
    """The slot index of each batch row, shared by every batched layer of one model.

    ``slots`` is None when no row of the current forward uses a LoRA adapter: the layers then skip the
    LoRA work entirely. ``rank`` is the largest rank among this forward's adapters: the layers read only
    that many rank rows of the slot tables, not the configured maximum. ``onehot`` ([rows, slots], set when
    the forward has many rows) selects the dense path: every slot's weights are read once and each row
    keeps its own slot's product, instead of copying each row's adapter out of the tables.

    ``use_kernel`` (default True): decode steps use the BGMV kernels where ``lora_kernel_available`` says
    they run; the engine sets it False to keep every forward on the torch paths (set it before capturing
    graphs: a captured graph keeps the path it was captured with).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, use_kernel: bool = True) -> None:
        self.dtype = dtype
        self.use_kernel = use_kernel
        self.slots: torch.Tensor | None = None
        self.rank = 0
        self.onehot: torch.Tensor | None = None

    def set(self, slots: torch.Tensor | None, rank: int, num_slots: int) -> None:
        """Point the layers at ``slots`` (a device tensor, possibly a static buffer a CUDA graph reads)."""
        self.slots, self.rank = (slots, rank) if slots is not None and rank else (None, 0)
        # Gathering copies one adapter per row, three times over (gather, then two products); the dense path
        # reads each slot once. Past about a third of the slots in rows, dense moves fewer bytes.
        dense = self.slots is not None and 3 * slots.shape[0] >= num_slots
        # A boolean select, not a multiply: 0 x inf = NaN, so another slot's product (which may overflow
        # for this row's activations) must be replaced, never scaled by zero.
        self.onehot = (torch.nn.functional.one_hot(slots, num_slots).bool()[:, None, None, :]
                       if dense else None)  # [rows, 1, 1, slots]


class BatchedLoraLinear(nn.Module):
    """A base linear (plain, bitsandbytes 8-bit or 4-bit) plus LoRA deltas, one adapter per row.

    Tables are rank-major, ``A: [R, slots, in]`` and ``B: [R, slots, out]``, so the first r ranks of every
    slot are one contiguous block: the dense path multiplies by ``A[:r]`` as one ``[r * slots, in]`` matrix.
    B is stored already multiplied by the adapter's scaling, which saves a kernel per layer per step.
    """

    def __init__(self, base_layer: nn.Module, rows: RowSlots, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        in_f, out_f = _linear_shape(base_layer)
        self.register_buffer("lora_a", torch.zeros(max_rank, num_slots, in_f, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_rank, num_slots, out_f, dtype=dtype, device=device))
        self._kernel_on: tuple[torch.device, Callable[..., None] | None] | None = None  # (device, kernel or None)

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[2]

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Write one adapter's weights into ``slot`` (zeros when the adapter does not target this layer)."""
        r = 0 if module is None else module.a.shape[0]
        if module is not None:
            self.lora_a[:r, slot].copy_(module.a, non_blocking=True)
            self.lora_b[:r, slot].copy_(module.b.t() * module.scaling)  # staged on the device by _fill
        if r < self.lora_a.shape[0]:
            self.lora_a[r:, slot].zero_()
            self.lora_b[r:, slot].zero_()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.rows.slots is None:
            return y
        kernel = self._decode_kernel(x, y)
        if kernel is not None:
            y = y if y.is_contiguous() else y.contiguous()
            kernel(y.view(x.shape[0], -1), x.reshape(x.shape[0], -1), self.lora_a, self.lora_b,
                   self.rows.slots, self.rows.rank)
            return y
        return self._dense(x, y) if self.rows.onehot is not None else self._gathered(x, y)

    def _decode_kernel(self, x: torch.Tensor, y: torch.Tensor) -> Callable[..., None] | None:
        """``lora_delta_`` when this forward goes to the BGMV kernels: a decode step (one token a row: x
        ``[rows, in]`` or ``[rows, 1, in]``, at most LORA_KERNEL_MAX_ROWS rows), nothing for autograd to track
        (y is updated in place), ``rows.use_kernel`` set, and the kernels available on x's device (asked, and
        the kernel module imported, once a device); else None."""
        rows = x.shape[0]
        if (not self.rows.use_kernel or rows > LORA_KERNEL_MAX_ROWS or x.dim() not in (2, 3)
                or x.numel() != rows * x.shape[-1] or x.requires_grad or y.requires_grad):
            return None
        if self._kernel_on is None or self._kernel_on[0] != x.device:
            kernel = None
            if lora_kernel_available(x.device):
                from ..kernels.lora_bgmv import lora_delta_ as kernel
            self._kernel_on = (x.device, kernel)
        return self._kernel_on[1]

    def _gathered(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        slots, r = self.rows.slots, self.rows.rank
        a = self.lora_a[:r].index_select(1, slots).transpose(0, 1)  # [B, r, in]
        b = self.lora_b[:r].index_select(1, slots).permute(1, 2, 0)  # [B, out, r], scaled
        xs = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.reshape(y.shape).to(y.dtype)

    def _dense(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r, (_, num_slots, in_f) = self.rows.rank, self.lora_a.shape
        xs = x.to(self.lora_a.dtype).reshape(x.shape[0], -1, in_f)  # [B, T, in]
        xa = (xs @ self.lora_a[:r].view(r * num_slots, in_f).t()).view(*xs.shape[:2], r, num_slots)
        xa = torch.where(self.rows.onehot, xa, 0.0).view(-1, r * num_slots)  # each row keeps its own slot's ranks
        out = y.reshape(-1, y.shape[-1])
        return torch.addmm(out.to(xa.dtype), xa, self.lora_b[:r].view(r * num_slots, -1)).view(y.shape).to(y.dtype)


def stage_on(device: torch.device, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """The modules' weights on ``device``, moved by one host-to-device copy when they share one (pinned)
    host buffer, as loaded adapters do: one large transfer instead of two small ones per module, after which
    filling a slot is device-side copies only."""
    tensors = [t for m in modules.values() for t in (m.a, m.b)]
    if not tensors or tensors[0].device == device:
        return modules
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous() for t in tensors):
        return {n: LoraModule(m.a.to(device, non_blocking=True), m.b.to(device, non_blocking=True), m.scaling)
                for n, m in modules.items()}
    on_device = torch.empty(0, dtype=torch.uint8).set_(storage).to(device, non_blocking=True)

    def same_view(t: torch.Tensor) -> torch.Tensor:
        start = t.storage_offset() * t.element_size()
        return on_device[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    return {n: LoraModule(same_view(m.a), same_view(m.b), m.scaling) for n, m in modules.items()}


class LoraSlotTable:
    """Assigns loaded LoRA adapters to the model's slots, least recently used first out.

    A slot in use by a running row is pinned (reference-counted) and never evicted. Layers are wrapped
    on first need, so a model serving only q/v adapters carries no tables for its MLP.
    """

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.num_slots = num_slots + 1  # slot 0: no adapter
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.rows = RowSlots(dtype)
        self.layers: dict[str, BatchedLoraLinear] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, in LRU order
        self._refs: dict[int, int] = {}
        self._rank_of: dict[int, int] = {}  # slot -> rank of the adapter in it
        self._free = list(range(self.num_slots - 1, 0, -1))
        self.wraps = 0  # base layers given LoRA tables, since start (changes the model: graphs re-capture)
        self.fills = 0  # adapters copied into a slot, since start
        self.evictions = 0  # adapters pushed out of a slot to make room, since start

    def resident_count(self) -> int:
        return len(self._slot_of)

    def resident(self, key: str) -> bool:
        return key in self._slot_of

    def has_room_for(self, key: str) -> bool:
        return key in self._slot_of or bool(self._free) or any(
            self._refs.get(s, 0) == 0 for s in self._slot_of.values())

    def acquire(self, key: str, weights: LoraWeights) -> int | None:
        """Pin ``key`` in a slot, loading it if needed; None when every slot is pinned by running rows."""
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._fill(slot, weights)
            self._slot_of[key] = slot
            self.fills += 1
        self._slot_of.move_to_end(key)
        self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def pinned(self) -> int:
        """Slots pinned by running rows now (any thread: a snapshot of the counts)."""
        return sum(1 for refs in list(self._refs.values()) if refs)

    def release(self, slot: int) -> None:
        if slot:
            self._refs[slot] -= 1

    def evict(self, key: str) -> bool:
        """Free ``key``'s slot unless a running row uses it. Returns whether it is gone."""
        slot = self._slot_of.get(key)
        if slot is None:
            return True
        if self._refs.get(slot, 0):
            return False
        del self._slot_of[key]
        for layer in self.layers.values():  # a free slot holds nothing of its last adapter
            layer.set_slot(slot, None)
        self._rank_of.pop(slot, None)
        self._free.append(slot)
        return True

    def rank_of(self, slots: Sequence[int]) -> int:
        """The largest rank among these slots' adapters (0 when no row uses one)."""
        return max((self._rank_of.get(s, 0) for s in slots if s), default=0)

    def set_rows(self, slots: list[int]) -> None:
        """Set the slot of each row for the next forward (None-out when every row is a base/prefix row)."""
        if any(slots):
            self.rows.set(torch.tensor(slots, dtype=torch.long, device=self.device), self.rank_of(slots),
                          self.num_slots)
        else:
            self.rows.set(None, 0, self.num_slots)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, slot in self._slot_of.items():  # least recently used first
            if self._refs.get(slot, 0) == 0:
                del self._slot_of[key]
                self.evictions += 1
                return slot
        return None

    def _fill(self, slot: int, weights: LoraWeights) -> None:
        for name in weights.modules:
            if name not in self.layers:
                self._wrap(name)
        modules = stage_on(self.device, weights.modules)
        for name, layer in self.layers.items():
            layer.set_slot(slot, modules.get(name))
        self._rank_of[slot] = weights.rank

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = BatchedLoraLinear(getattr(parent, child), self.rows, self.num_slots, self.max_rank,
                                  self.dtype, self.device)
        setattr(parent, child, layer)
        self.layers[name] = layer
        self.wraps += 1
