"""LoRA serving: the batched layer that serves many adapters in one forward (its slots: ``lora_slots.py``).

Every base linear that some loaded adapter targets is wrapped once in a ``BatchedLoraLinear``. It holds
the adapters' weights stacked in slots, rank-major: ``A: [R, slots, in]`` and ``B: [R, slots, out]`` (R, the
configured maximum rank; smaller ranks are zero-padded, which adds exact zeros), B already multiplied by the
adapter's scaling.
Each forward of a step runs inside that step's context (``engine/step_context.py``), which holds one slot
index per batch row (``LoraRows``), and the layer adds each row's own ``scaling * (x @ A^T) @ B^T`` to the
base output: the S-LoRA/Punica idea. A forward with few rows gathers each row's A and B; one with many rows
reads every slot once and keeps each row's own product (dense).
Slot 0 stays all zeros and means "no adapter", so base rows get exactly the base output.
As in vLLM's punica wrapper, the kernel is chosen once, when the slot table is built for its device, and the
step says whether it is a prefill or a decode: a decode step (one token a row, at most 64 rows) on a GPU goes
to the BGMV kernels of ``server/kernels/lora_bgmv.py`` (two launches a layer that read only the slots in
use); a prefill, and any step where the kernels do not run, to the torch paths.
An attention's q, k and v share their input: their wrapped layers form a ``LoraGroup`` (A tables stacked in
one buffer), which the engine's own decoder calls through ``project_qkv``: one shrink for the three (as
vLLM's merged QKV LoRA layer does with its slices), then each layer's expand (at a decode step, folded into
the rotary kernel: ``lora_folds.py``, which also folds o_proj's shrink into the attention). An MLP's gate and
up form one too (``project_shared``): one shrink and one expand launch for the two.
Parsing and checking the files is ``lora_weights.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.step_context import current_step
from ..kernels import lora_kernel_available
from .lora_weights import LoraModule

QKV = ("q_proj", "k_proj", "v_proj")  # an attention's projections of one input: a LoraGroup when wrapped
GATE_UP = ("gate_proj", "up_proj")  # an MLP's projections of one input, before act(gate) * up: a LoraGroup too
SHARED_INPUTS = (QKV, GATE_UP)  # sibling layers that read one input


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


@dataclass(frozen=True)
class LoraRows:
    """One forward's LoRA rows, built by ``LoraSlotTable.rows_for`` for the step's phase and read by every
    batched layer from the step's context (``engine/step_context.py``).

    ``slots`` ([rows] long, on the tables' device; a step's static buffer under CUDA graphs) is each row's
    slot; ``rank`` the largest rank among their adapters (a bucket under graphs): the layers read only that
    many rank rows of the tables, not the configured maximum. ``kernel`` is the BGMV kernel when this forward
    is a decode step that it serves; else ``onehot`` ([rows, 1, 1, slots] bool) selects the dense torch path
    (every slot's weights read once, each row keeping its own slot's product) and None the gathered one
    (each row's adapter copied out of the tables).
    """

    slots: torch.Tensor
    rank: int
    onehot: torch.Tensor | None = None
    kernel: Callable[..., None] | None = None


def decode_kernel(device: torch.device) -> Callable[..., None] | None:
    """``lora_delta_`` where the BGMV kernels run on ``device`` (asked once: on a GPU the first ask compiles
    and runs a test kernel), else None: the torch paths."""
    if not lora_kernel_available(device):
        return None
    from ..kernels import lora_bgmv

    return lora_bgmv.lora_delta_


def group_kernel() -> Callable[..., None]:
    """``lora_group_delta_``: the grouped launch beside ``lora_delta_``, for a table whose decode kernel is
    it (asked when a group forms, from the same module)."""
    from ..kernels import lora_bgmv

    return lora_bgmv.lora_group_delta_


class SlotWrites:
    """The writes that fill (or clear) one slot in every wrapped layer, issued as three batched calls
    (``torch._foreach_*``) instead of 3-5 per layer. A slot fill runs on the engine thread between steps,
    every row waiting: at 128 wrapped layers (a 7B model, q/k/v/o) that was 384-640 calls from Python, each a
    kernel launch on a GPU. On the CPU machine the fill costs the same either way (its time is the bytes
    copied); the GPU saving is not measured yet. The values are the per-layer writes' exactly: B times the
    adapter's scaling in B's dtype, then cast to the table's."""

    def __init__(self) -> None:
        self.copy_to: list[torch.Tensor] = []
        self.copy_from: list[torch.Tensor] = []
        self.scaled_to: list[torch.Tensor] = []
        self.scaled_from: list[torch.Tensor] = []
        self.scalings: list[float] = []
        self.zeros: list[torch.Tensor] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor, scaling: float | None = None) -> None:
        if scaling is None:
            self.copy_to.append(dst)
            self.copy_from.append(src)
        else:
            self.scaled_to.append(dst)
            self.scaled_from.append(src)
            self.scalings.append(scaling)

    def zero(self, dst: torch.Tensor) -> None:
        self.zeros.append(dst)

    def run(self) -> None:
        if self.scaled_from:
            self.copy_to += self.scaled_to
            self.copy_from += torch._foreach_mul(self.scaled_from, self.scalings)
        if self.copy_to:
            torch._foreach_copy_(self.copy_to, self.copy_from, non_blocking=True)
        if self.zeros:
            torch._foreach_zero_(self.zeros)


class BatchedLoraLinear(nn.Module):
    """A base linear (plain, bitsandbytes 8-bit or 4-bit) plus LoRA deltas, one adapter per row.

    Tables are rank-major, ``A: [R, slots, in]`` and ``B: [R, slots, out]``, so the first r ranks of every
    slot are one contiguous block: the dense path multiplies by ``A[:r]`` as one ``[r * slots, in]`` matrix.
    B is stored already multiplied by the adapter's scaling, which saves a kernel per layer per step.
    The rows of a forward come from the step's context, never from a field of the layer.
    """

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_f, out_f = _linear_shape(base_layer)
        self.register_buffer("lora_a", torch.zeros(max_rank, num_slots, in_f, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(max_rank, num_slots, out_f, dtype=dtype, device=device))
        self.group: LoraGroup | None = None  # set when a sibling sharing x is wrapped too (LoraSlotTable)

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[2]

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Write one adapter's weights into ``slot`` (zeros when the adapter does not target this layer)."""
        writes = SlotWrites()
        self.plan_slot(slot, module, writes)
        writes.run()

    def plan_slot(self, slot: int, module: LoraModule | None, writes: SlotWrites) -> None:
        """Add ``set_slot``'s writes to ``writes`` (views only: nothing is written until ``writes.run()``)."""
        r = 0 if module is None else module.a.shape[0]
        if module is not None:
            writes.copy(self.lora_a[:r, slot], module.a)
            writes.copy(self.lora_b[:r, slot], module.b.t(), module.scaling)  # B is stored scaled
        if r < self.lora_a.shape[0]:
            writes.zero(self.lora_a[r:, slot])
            writes.zero(self.lora_b[r:, slot])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_delta(x, self.base_layer(x, *args, **kwargs))

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base layer's output for x, from it or from a fused matmul's split) plus each row's delta."""
        rows = current_step().lora
        return y if rows is None else _add_deltas(x, [y], (self,), self.lora_a[None], rows, None)[0]

    def expand(self, x: torch.Tensor, y: torch.Tensor, rows: LoraRows, xa: torch.Tensor) -> torch.Tensor:
        """``y`` plus this layer's B applied to ``xa``, the rows' ``x @ A^T`` from ``shrink`` (torch paths)."""
        r, slots = rows.rank, rows.slots
        if rows.onehot is None:  # gathered: xa [B, T, r]
            b = self.lora_b[:r].index_select(1, slots).permute(1, 2, 0)  # [B, out, r], scaled
            return y + torch.bmm(xa, b.transpose(1, 2)).reshape(y.shape).to(y.dtype)
        num_slots = self.lora_a.shape[1]  # dense: xa [B * T, r * slots]
        xa = torch.where(rows.onehot, xa.view(x.shape[0], -1, r, num_slots), 0.0)  # each row keeps its own slot's
        out = y.reshape(-1, y.shape[-1])
        return torch.addmm(out.to(xa.dtype), xa.view(-1, r * num_slots),
                           self.lora_b[:r].view(r * num_slots, -1)).view(y.shape).to(y.dtype)


def shrink(lora_a: torch.Tensor, x: torch.Tensor, rows: LoraRows) -> torch.Tensor:
    """``x @ A^T`` for G layers that share x, their A tables stacked ``[G, R, slots, in]`` (one layer: G = 1),
    by one batched matmul; member g's is ``[g]``. Gathered (``rows.onehot`` None): each row's own slot,
    ``[G, B, T, r]``; dense: every slot, ``[G, B * T, r * slots]`` (the first r rank rows of a member's
    table are one contiguous block, so no copy)."""
    r, (members, _, num_slots, in_f) = rows.rank, lora_a.shape
    xs = x.to(lora_a.dtype).reshape(x.shape[0], -1, in_f)  # [B, T, in]
    if rows.onehot is None:
        a = lora_a[:, :r].index_select(2, rows.slots)  # [G, r, B, in]
        return xs @ a.permute(0, 2, 3, 1)  # [B, T, in] @ [G, B, in, r]
    return xs.reshape(-1, in_f) @ lora_a[:, :r].view(members, r * num_slots, in_f).transpose(1, 2)


class LoraGroup:
    """LoRA layers that share their input, an attention's q, k and v (``QKV``) or an MLP's gate and up
    (``GATE_UP``): their A tables live stacked
    in one buffer, ``lora_a [G, R, slots, in]``, and each member's ``lora_a`` is its view ``[g]``, so slot
    writes and the member's own forward (transformers' path) are unchanged. Called on x (the engine's own
    decoder does, through ``project_shared``), it runs one shrink for all G members (one kernel launch, or one
    batched matmul), then each member's expand: the same sums as each member alone. ``kernel``: the grouped
    launch of the decode kernel the table chose (None where the table has none)."""

    def __init__(self, members: Sequence[BatchedLoraLinear], kernel: Callable[..., None] | None) -> None:
        self.members = tuple(members)
        self.kernel = kernel
        self.lora_a = torch.stack([m.lora_a for m in self.members])  # a copy: earlier slot fills kept
        for g, member in enumerate(self.members):
            member.lora_a = self.lora_a[g]
            member.group = self

    def __call__(self, x: torch.Tensor, base: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each member's output for x: its base layer's (or ``base``, the members' base outputs already
        computed) plus each row's own LoRA delta."""
        ys = list(base) if base is not None else [m.base_layer(x) for m in self.members]
        rows = current_step().lora
        return ys if rows is None else _add_deltas(x, ys, self.members, self.lora_a, rows, self.kernel)


def _add_deltas(x: torch.Tensor, ys: list[torch.Tensor], members: Sequence[BatchedLoraLinear],
                lora_a: torch.Tensor, rows: LoraRows, group_kernel: Callable[..., None] | None) -> list[torch.Tensor]:
    """``ys`` (the members' base outputs for x) plus each row's delta: the decode kernel (in place: one
    member, the rows' kernel; several, its grouped launch), or the torch paths (one shrink, then each
    member's expand). ``lora_a``: the members' A stacked, [G, R, S, in]."""
    if rows.kernel is None:
        xa = shrink(lora_a, x, rows)
        return [m.expand(x, y, rows, xa_g) for m, y, xa_g in zip(members, ys, xa, strict=True)]
    # A decode step: one token a row, so each y views as [rows, out]. The kernel reads y's strides: a fused
    # matmul's split (rows strided by the fused width, columns contiguous) takes its delta in place, uncopied.
    ys = [y if y.stride(-1) == 1 else y.contiguous() for y in ys]
    flat, outs = x.reshape(x.shape[0], -1), [y.view(x.shape[0], -1) for y in ys]
    if len(members) == 1:
        rows.kernel(outs[0], flat, members[0].lora_a, members[0].lora_b, rows.slots, rows.rank)
    else:
        group_kernel(outs, flat, lora_a, [m.lora_b for m in members], rows.slots, rows.rank)
    return ys


def adds_delta(layer: nn.Module) -> bool:
    """Whether ``add_delta`` may add anything to ``layer``'s output in the current step: it is wrapped and the
    step has LoRA rows."""
    return isinstance(layer, BatchedLoraLinear) and current_step().lora is not None


def add_delta(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, the base output of ``layer`` for x, plus its rows' LoRA deltas where ``layer`` is wrapped."""
    return layer.add_delta(x, y) if isinstance(layer, BatchedLoraLinear) else y


def project_qkv(attn: nn.Module, x: torch.Tensor, base: Sequence[torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn``'s q, k and v projections of x (``project_shared`` over ``QKV``)."""
    q, k, v = project_shared(attn, QKV, x, base)
    return q, k, v


def project_shared(parent: nn.Module, names: Sequence[str], x: torch.Tensor,
                   base: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``parent``'s projections ``names`` of x (one of ``SHARED_INPUTS``: q, k and v; gate and up); those in a
    ``LoraGroup`` run as one (one shrink for their LoRA, one expand launch), the others (no adapter targets them)
    alone. ``base``: their base outputs already computed (one fused matmul, ``engine/fused_projections.py``): only
    the deltas are added, each to its own."""
    layers = [getattr(parent, name) for name in names]
    group = next((layer.group for layer in layers if isinstance(layer, BatchedLoraLinear)
                  and layer.group is not None), None)
    given = dict(zip(layers, base, strict=True)) if base is not None else None
    grouped = {}
    if group is not None:
        member_base = None if given is None else [given[m] for m in group.members]
        grouped = dict(zip(group.members, group(x, member_base), strict=True))

    def output(layer: nn.Module) -> torch.Tensor:
        if layer in grouped:
            return grouped[layer]
        return layer(x) if given is None else add_delta(layer, x, given[layer])

    return [output(layer) for layer in layers]


def base_layer_of(module: nn.Module) -> nn.Module:
    """The base layer under a LoRA wrapper, or the module itself."""
    return module.base_layer if isinstance(module, BatchedLoraLinear) else module
