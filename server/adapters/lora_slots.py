"""The LoRA slot table: which loaded adapter sits in which slot of the model's batched LoRA layers.

An adapter in use by a running row is pinned in its slot (reference-counted); the others leave least recently
used first when a new one needs room. Filling a slot copies the adapter's factors into every wrapped layer's
tables (``lora.BatchedLoraLinear.plan_slot``, all the layers' copies run together: ``lora.SlotWrites``), out of
one host-to-device transfer of its pinned buffer (``stage_on``). Base layers are wrapped on first need, and
siblings that read one input (q, k, v; gate, up) are stacked into a ``lora.LoraGroup`` as they are wrapped.
At each forward the table routes the step's rows (``rows_for``): the decode kernel chosen once for the
device, or the gathered or dense torch paths of ``lora.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..engine.step_context import Phase
from ..kernels import LORA_KERNEL_MAX_ROWS
from .lora import SHARED_INPUTS, BatchedLoraLinear, LoraGroup, LoraRows, SlotWrites, decode_kernel, group_kernel
from .lora_weights import LoraModule, LoraWeights


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
    on first need, so a model serving only q/v adapters carries no tables for its MLP. The decode kernel is
    chosen here, once for the device (``use_kernel=False``: the torch paths everywhere, ``--no-fused-kernels``).
    """

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, use_kernel: bool = True) -> None:
        self.model = model
        self.num_slots = num_slots + 1  # slot 0: no adapter
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.decode_kernel = decode_kernel(device) if use_kernel else None
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
        writes = SlotWrites()
        for layer in self.layers.values():  # a free slot holds nothing of its last adapter
            layer.plan_slot(slot, None, writes)
        writes.run()
        self._rank_of.pop(slot, None)
        self._free.append(slot)
        return True

    def rank_of(self, slots: Sequence[int]) -> int:
        """The largest rank among these slots' adapters (0 when no row uses one)."""
        return max((self._rank_of.get(s, 0) for s in slots if s), default=0)

    def rows_for(self, slots: torch.Tensor, rank: int, phase: Phase) -> LoraRows | None:
        """The LoRA rows of one forward: each row's slot (``slots``, a device tensor, possibly a static buffer
        a CUDA graph reads) and the ``rank`` to read, routed for ``phase``; None when no row uses an adapter
        (``rank`` 0). Decode steps of at most LORA_KERNEL_MAX_ROWS rows go to the kernel, if any, unless
        autograd is on (the kernel adds into the base output in place, which autograd cannot track)."""
        if not rank:
            return None
        if (phase == "decode" and self.decode_kernel is not None and slots.shape[0] <= LORA_KERNEL_MAX_ROWS
                and not torch.is_grad_enabled()):
            return LoraRows(slots, rank, kernel=self.decode_kernel)
        # Gathering copies one adapter per row, three times over (gather, then two products); the dense path
        # reads each slot once. Past about a third of the slots in rows, dense moves fewer bytes.
        if 3 * slots.shape[0] < self.num_slots:
            return LoraRows(slots, rank)
        # A boolean select, not a multiply: 0 x inf = NaN, so another slot's product (which may overflow
        # for this row's activations) must be replaced, never scaled by zero.
        onehot = torch.nn.functional.one_hot(slots, self.num_slots).bool()[:, None, None, :]
        return LoraRows(slots, rank, onehot)

    def rows_of(self, slots: Sequence[int], phase: Phase) -> LoraRows | None:
        """``rows_for`` from host slot ids (the general prefill: shapes vary, nothing static to read)."""
        if not any(slots):
            return None
        return self.rows_for(torch.tensor(list(slots), dtype=torch.long, device=self.device),
                             self.rank_of(slots), phase)

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
        writes = SlotWrites()
        for name, layer in self.layers.items():
            layer.plan_slot(slot, modules.get(name), writes)
        writes.run()
        self._rank_of[slot] = weights.rank

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = BatchedLoraLinear(getattr(parent, child), self.num_slots, self.max_rank, self.dtype,
                                  self.device)
        setattr(parent, child, layer)
        self.layers[name] = layer
        self.wraps += 1
        for siblings in SHARED_INPUTS:
            if child in siblings:
                self._group([f"{parent_name}.{c}" if parent_name else c for c in siblings])

    def _group(self, names: list[str]) -> None:
        """Stack the wrapped ones of these siblings (q, k, v; gate, up) into one LoraGroup, again at each new member
        (the new stack copies what earlier slot fills wrote; ``wraps`` changed, so graphs re-capture). A
        member that no adapter targets stays unwrapped: its base output only, none of its zeros read."""
        members = [self.layers[n] for n in names if n in self.layers]
        if len(members) > 1 and len({m.in_features for m in members}) == 1:
            LoraGroup(members, group_kernel() if self.decode_kernel is not None else None)
