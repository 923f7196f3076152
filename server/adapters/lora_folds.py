"""LoRA steps folded into the own decoder's decode kernels (issue 18): the expands, and o_proj's shrink, saved.

At a decode step that the BGMV kernels serve (``lora.py``), an attention's LoRA costs four launches a layer: the
q/k/v shrink and expand (one each for the group), o_proj's shrink and expand. Two of them fold into kernels that
run anyway, right beside them:

* q, k and v's expand into the rotary + append kernel (``kernels/rope_append.py``), which reads q, k and v next:
  ``qkv_shrink`` runs the shrink and hands back the deltas still to add (``QkvDeltas``), the base outputs
  their own (``project_qkv_deferred``); program (row, head) adds its head's delta, as the expand would, before
  rotating.
* o_proj's shrink into the decode attention's merge (``kernels/decode_attention.py``): head h's output is split
  h of o_proj's input, so the program that writes it also writes its partial (``output_shrink``); o_proj then
  runs its base matmul and the expand alone (``add_expand``); at decode steps (from the decoder's
  ``NORM_FOLD_MIN_ROWS`` rows) not even that: its delta goes to the post-attention add + norm (``OutputDelta``,
  ``kernels/rms_norm.py``), which adds it to o_proj's output before the residual add, as the expand would; or,
  where ``kernels/int8_expand.py``'s ``IN_MATMUL`` is on, the delta's sums run as extra programs of o_proj's own
  split-K launch (``expand_in_matmul``) and that norm adds them.
* at as many rows, down_proj's expand likewise into the next layer's add + norm (``deferred_delta``: its shrink
  runs alone, its delta waits for that kernel).
* gate and up's expand (one group: one shrink for the two) into the SiLU product's kernel (``kernels/silu_mul.py``),
  which reads gate and up next: ``glu_shrink`` runs the shrink and hands back ``GluDeltas``; program
  (row, columns) adds its columns' deltas, as the expand would, before the SiLU.

The shrinks that remain (q/k/v's, gate/up's, down_proj's) read only their layer's input, as its base matmul
does: the decoder launches each right after that matmul, or beside it on a second stream where switched on
(``engine/side_stream.py``: measured no gain on the H200, so off), or over an int8 base as extra programs of the
matmul's own launch (``qkv_in_matmul``, ``glu_in_matmul``, ``deferred_in_matmul``: ``kernels/int8_shrink.py``, on:
1.0-2.3% off a LoRA step on the H200), over a float base likewise where its matmuls go through the same split-K
kernel (``kernels/dense_splitk.py``, on: 2.2% off a 32-row bf16 LoRA step on an H100); o_proj's there too
rather than in the merge where ``O_PROJ_IN_MATMUL`` is on (off).

Where a fold cannot run (no adapter row, a prefill, q/k/v wrapped but not one group, SDPA instead of the
attention kernel), the unfolded launches run: the same sums either way (``tests/server/adapters``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engine.step_context import current_step
from ..kernels import dense_splitk
from ..kernels.decode_attention import OutputShrink
from ..kernels.rms_norm import OutputDelta
from ..kernels.rope_append import QkvDeltas
from ..kernels.silu_mul import GluDeltas
from .lora import GATE_UP, QKV, BatchedLoraLinear, base_layer_of, project_qkv, project_shared

if TYPE_CHECKING:
    from ..engine.fused_projections import FusedLinear
    from ..kernels.lora_bgmv import LoraPartials

# o_proj's LoRA shrink in its own matmul's launch (``deferred_in_matmul``, as down_proj's) rather than in the decode
# attention's merge (``output_shrink``; +67 us a 32-row bf16 step on 32 adapters at 89ba5f3, 2 us a layer), where
# that matmul hosts it (``hosts_own_shrink``). Off until timed on the GPU (bench/pdl_bench.py --switch oproj).
O_PROJ_IN_MATMUL = False


def qkv_shrink(attn: nn.Module, x: torch.Tensor) -> QkvDeltas | None:
    """At a decode step that the BGMV kernels serve, q, k and v's one shrink of x (one launch) with their B tables:
    the deltas still to add (``QkvDeltas``), which the rotary + append kernel adds before rotating
    (``kernels/rope_append.py``: the expand's launch saved) or ``add_qkv_deltas`` adds in place. None, and nothing
    launched, where it does not apply: no adapter row at this step, another kind of step, or wrapped q/k/v that do
    not form one group. It reads nothing that q/k/v's base matmul writes: the decoder launches it right after that
    matmul, or beside it (``engine/side_stream.py``), or in it (``qkv_in_matmul``)."""
    found = _qkv_lora(attn)
    if found is None:
        return None
    lora_a, tables, slots, rank = found
    from ..kernels.lora_bgmv import lora_shrink

    return QkvDeltas(lora_shrink(x.reshape(x.shape[0], -1), lora_a, slots, rank), tables)


def qkv_in_matmul(attn: nn.Module, x: torch.Tensor,
                  qkv: FusedLinear | None) -> tuple[QkvDeltas, list[torch.Tensor]] | None:
    """``(qkv_shrink(attn, x), q/k/v's base outputs)`` from one launch: the shrink as extra programs of their fused
    int8 matmul (``FusedLinear.with_shrink``, ``kernels/int8_shrink.py``). None, and nothing launched, where that
    does not run (no fused int8 matmul, the switch off, or no shrink to do: ``qkv_shrink``'s cases)."""
    found = _qkv_lora(attn) if qkv is not None and qkv.shrinks_in_launch() and qkv.current(attn) else None
    if found is None:
        return None
    lora_a, tables, slots, rank = found
    done = qkv.with_shrink(x, lora_a, slots, rank)
    if done is None:
        return None
    base, partials = done
    return QkvDeltas(partials, tables), base


def _qkv_lora(attn: nn.Module) -> tuple[torch.Tensor, tuple, torch.Tensor, int] | None:
    """q, k and v's shrink at this step, where one applies (``qkv_shrink``): their A tables stacked, their B
    tables (None for a member not wrapped), the rows' slots and the rank."""
    rows = current_step().lora
    layers = [getattr(attn, name) for name in QKV]
    wrapped = [layer for layer in layers if isinstance(layer, BatchedLoraLinear)]
    group = wrapped[0].group if wrapped else None
    if rows is None or rows.kernel is None or not wrapped or (
            len(wrapped) > 1 and (group is None or list(group.members) != wrapped)):
        return None
    lora_a = group.lora_a if len(wrapped) > 1 else wrapped[0].lora_a[None]
    tables = tuple(layer.lora_b if isinstance(layer, BatchedLoraLinear) else None for layer in layers)
    return lora_a, tables, rows.slots, rows.rank


def project_qkv_deferred(attn: nn.Module, x: torch.Tensor, base: Sequence[torch.Tensor] | None,
                         deltas: QkvDeltas | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v's outputs for x: with ``deltas`` (``qkv_shrink``'s), their base outputs alone (``base``, the
    fused matmul's, else each base layer's), the deltas still to add; without, ``project_qkv`` (each layer's
    delta added)."""
    if deltas is None:
        return project_qkv(attn, x, base)
    q, k, v = list(base) if base is not None else [base_layer_of(getattr(attn, name))(x) for name in QKV]
    return q, k, v


def add_qkv_deltas(deltas: QkvDeltas, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``deltas`` added to q, k and v in place (the expand launch ``project_qkv`` would have run): where the
    rotary kernel could not take them. Each is one token a row, its columns contiguous (a view of its output)."""
    from ..kernels.lora_bgmv import lora_expand_

    members = [(t, b) for t, b in zip((q, k, v), deltas.tables, strict=True) if b is not None]
    lora_expand_([t.view(t.shape[0], -1) for t, _ in members], deltas.partials, [b for _, b in members])


def glu_shrink(mlp: nn.Module, x: torch.Tensor) -> GluDeltas | None:
    """At a decode step that the BGMV kernels serve, with gate and up in one group: their one shrink of x (one
    launch) with their B tables, the deltas still to add (``GluDeltas``), which the SiLU product's kernel adds
    (``kernels/silu_mul.py``: the expand's launch saved) or ``add_glu_deltas``. None, and nothing launched, where
    it does not apply (no adapter row at this step, another kind of step, only one of the two wrapped). Like
    ``qkv_shrink``, launched after (or beside, or in: ``glu_in_matmul``) the fused gate/up matmul."""
    found = _glu_lora(mlp)
    if found is None:
        return None
    gate, up, slots, rank = found
    from ..kernels.lora_bgmv import lora_shrink

    return GluDeltas(lora_shrink(x.reshape(x.shape[0], -1), gate.group.lora_a, slots, rank), gate.lora_b, up.lora_b)


def glu_in_matmul(mlp: nn.Module, x: torch.Tensor,
                  gate_up: FusedLinear | None) -> tuple[GluDeltas, list[torch.Tensor]] | None:
    """``(glu_shrink(mlp, x), gate's and up's base outputs)`` from their fused int8 matmul's one launch, as
    ``qkv_in_matmul``; None, and nothing launched, where that does not run."""
    found = _glu_lora(mlp) if gate_up is not None and gate_up.shrinks_in_launch() and gate_up.current(mlp) else None
    if found is None:
        return None
    gate, up, slots, rank = found
    done = gate_up.with_shrink(x, gate.group.lora_a, slots, rank)
    if done is None:
        return None
    base, partials = done
    return GluDeltas(partials, gate.lora_b, up.lora_b), base


def _glu_lora(mlp: nn.Module) -> tuple[BatchedLoraLinear, BatchedLoraLinear, torch.Tensor, int] | None:
    """gate and up (one group) and the rows' slots and rank, where ``glu_shrink`` applies at this step."""
    gate, up = (getattr(mlp, name) for name in GATE_UP)
    group = gate.group if isinstance(gate, BatchedLoraLinear) else None
    # the step's rows asked only where gate and up are wrapped: a forward of the base alone may run outside a step
    rows = current_step().lora if group is not None else None
    if rows is None or rows.kernel is None or group is None or list(group.members) != [gate, up]:
        return None
    return gate, up, rows.slots, rows.rank


def project_glu_deferred(mlp: nn.Module, x: torch.Tensor, base: Sequence[torch.Tensor],
                         deltas: GluDeltas | None) -> tuple[torch.Tensor, torch.Tensor]:
    """gate's and up's outputs for x from their fused matmul's ``base``: with ``deltas`` (``glu_shrink``'s), the
    base alone, the deltas still to add; without, ``project_shared`` (each layer's delta added: one shrink and one
    expand launch for the two where both are wrapped)."""
    if deltas is None:
        return project_shared(mlp, GATE_UP, x, base)
    return base[0], base[1]


def add_glu_deltas(deltas: GluDeltas, gate: torch.Tensor, up: torch.Tensor) -> None:
    """``deltas`` added to gate and up in place (the expand launch ``project_shared`` would have run), where the
    SiLU product's kernel could not take them. Each is one token a row, its columns contiguous."""
    from ..kernels.lora_bgmv import lora_expand_

    lora_expand_([gate.view(gate.shape[0], -1), up.view(up.shape[0], -1)], deltas.partials,
                 [deltas.gate_b, deltas.up_b])


def output_shrink(layer: nn.Module, rows: int, heads: int) -> OutputShrink | None:
    """For an attention's o_proj at a decode step that the BGMV kernels serve: the shrink that the decode
    attention's merge computes for it (``kernels/decode_attention.OutputShrink``, one split a head, partials
    unwritten yet); None where it does not apply (no adapter row, another kind of step, o_proj not wrapped, or
    more partials than an expand program sums)."""
    step_rows = current_step().lora
    if step_rows is None or step_rows.kernel is None or not isinstance(layer, BatchedLoraLinear):
        return None
    from ..kernels.lora_bgmv import MAX_PARTIALS, LoraPartials, block_r_for

    block_r = block_r_for(step_rows.rank)
    if heads * block_r > MAX_PARTIALS:
        return None
    p = torch.empty((1, heads, rows, block_r), device=layer.lora_a.device, dtype=torch.float32)
    return OutputShrink(layer.lora_a, LoraPartials(p, step_rows.slots, step_rows.rank))


def add_expand(layer: BatchedLoraLinear, y: torch.Tensor, partials: LoraPartials) -> torch.Tensor:
    """``y`` (``layer``'s base output at a decode step) plus its rows' deltas from ``partials``, its shrink
    already done (``output_shrink``): the expand alone, in place."""
    return add_output_delta(output_delta(layer, partials), y)


def output_delta(layer: BatchedLoraLinear, partials: LoraPartials) -> OutputDelta:
    """``layer``'s delta from ``partials`` (its shrink done, ``output_shrink``), not yet added: for the add + norm
    kernel after it (``FusedRMSNorm.add_forward``), or ``add_output_delta``."""
    return OutputDelta(partials, layer.lora_b)


def expand_in_matmul(layer: BatchedLoraLinear, x: torch.Tensor,
                     delta: OutputDelta) -> tuple[torch.Tensor, OutputDelta] | None:
    """``(layer``'s base output, ``delta`` (``output_delta``) with its sums done``)`` from its base matmul's one split-K
    launch (``dense_splitk.layer_with_expand``: ``kernels/int8_expand.py``, switched by its ``IN_MATMUL``), for the
    add + norm after it to add; None, and nothing launched, where that does not run."""
    return dense_splitk.layer_with_expand(base_layer_of(layer), x, delta)


def defers_delta(layer: nn.Module) -> bool:
    """Whether ``deferred_delta`` applies to ``layer`` at this step: a wrapped layer of no group (down_proj) at a
    decode step that the BGMV kernels serve."""
    if not isinstance(layer, BatchedLoraLinear) or layer.group is not None:
        return False
    rows = current_step().lora
    return rows is not None and rows.kernel is not None


def deferred_delta(layer: BatchedLoraLinear, x: torch.Tensor) -> OutputDelta:
    """For a layer that ``defers_delta`` (the caller checked): its shrink of x now (one launch; it reads nothing of
    the layer's base matmul, after or beside which the decoder launches it), its delta left for the add + norm
    kernel after it (``OutputDelta``)."""
    from ..kernels.lora_bgmv import lora_shrink

    rows = current_step().lora
    return OutputDelta(lora_shrink(x.reshape(x.shape[0], -1), layer.lora_a[None], rows.slots, rows.rank),
                       layer.lora_b)


def deferred_in_matmul(layer: BatchedLoraLinear, x: torch.Tensor) -> tuple[OutputDelta, torch.Tensor] | None:
    """For a layer that ``defers_delta`` (the caller checked): ``(deferred_delta(layer, x), its base output)`` from
    its split-K matmul's one launch (``dense_splitk.layer_with_shrink``: the int8 layer's or the float weight's);
    None, and nothing launched, where that does not run (the switches off, a bucket not tuned)."""
    if not hosts_own_shrink(layer):
        return None
    rows = current_step().lora
    done = dense_splitk.layer_with_shrink(base_layer_of(layer), x, layer.lora_a[None], rows.slots, rows.rank)
    if done is None:
        return None
    y, partials = done
    return OutputDelta(partials, layer.lora_b), y


def hosts_own_shrink(layer: nn.Module) -> bool:
    """Whether ``layer``'s base matmul may run its LoRA shrink in its own launch (``kernels/int8_shrink.py``):
    ``dense_splitk.layer_shrinks_in_launch`` of it."""
    return dense_splitk.layer_shrinks_in_launch(base_layer_of(layer))


def o_proj_shrink_in_merge(o_proj: nn.Module) -> bool:
    """Whether o_proj's shrink goes to the decode attention's merge (``output_shrink``): unless ``O_PROJ_IN_MATMUL``
    and o_proj's matmul hosts it (``hosts_own_shrink``; then ``deferred_in_matmul`` runs it there)."""
    return not (O_PROJ_IN_MATMUL and hosts_own_shrink(o_proj))


def add_output_delta(delta: OutputDelta, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus ``delta`` (the expand alone, in place), where the norm after it cannot take the delta: its sums
    where already done (``delta.done``), added in fp32 and rounded as the expand adds its own."""
    from ..kernels.lora_bgmv import lora_expand_

    y = y if y.stride(-1) == 1 else y.contiguous()
    if delta.done is not None:
        rows = y.view(y.shape[0], -1)
        lora = (delta.partials.slots != 0)[:, None]  # a base row (slot 0) keeps y as it is
        rows.copy_(torch.where(lora, (rows.float() + delta.done).to(y.dtype), rows))
        return y
    lora_expand_((y.view(y.shape[0], -1),), delta.partials, (delta.lora_b,))
    return y
