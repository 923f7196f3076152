"""Fused base projections for the engine's own decoder: an attention's q, k and v as one matmul, an MLP's gate
and up as one (vLLM's ``QKVParallelLinear`` and ``MergedColumnParallelLinear``, gpt-fast's ``wqkv``).

At decode batch sizes a matmul's time is its weight's bytes over the bandwidth it reaches, and a small N
reaches little of it (H200, M = 1, bench/RESULTS.md: int8 4096x4096 reads at 1.06 TB/s, 11008x4096 at 1.96).
One ``[q + k + v, in]`` matmul, then a split of its output, reads the same bytes in one launch with more
outputs in flight; the same for ``[gate + up, in]``.

No extra memory: at engine start the fused weight is allocated once, each projection is copied into its rows,
and each module's weight (an int8 layer's row scales, a bias where present) becomes a view of its own rows (the
rows of a row-major ``[N, K]`` tensor are contiguous), so the modules' old tensors are freed and everything
that reads the modules (transformers' forward, the LoRA wrappers' ``base_layer``, merges) reads the same
memory. Fusing modules that already lie back to back (fused by an earlier decoder over the same model) copies
nothing.

Fused are plain float ``nn.Linear`` layers and the engine's int8 kernel layer (``Int8WeightOnlyLinear``: per-row
scales concatenate exactly), all of one type, dtype, device and input size, all with a bias or none. Anything
else (bitsandbytes layers that were not swapped: no Triton, nf4) stays unfused and the decoder calls those
modules as before. A fusion whose modules were replaced since (``current``) is not used either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters.lora import GATE_UP, QKV, base_layer_of
from ..kernels import dense_gemv, dense_splitk
from ..kernels.int8_linear import Int8WeightOnlyLinear
from .swaps import same_forward

if TYPE_CHECKING:
    from ..kernels.lora_bgmv import LoraPartials

log = logging.getLogger(__name__)

_FUSABLE = (nn.Linear, Int8WeightOnlyLinear)  # exact types: bitsandbytes' layers subclass nn.Linear


class FusedLinear:
    """One matmul over the concatenated weights of ``parent``'s modules ``names`` (which share their input);
    called on x, it gives each module's base output, a view of the one output's columns."""

    def __init__(self, parent: nn.Module, names: Sequence[str], matmul: nn.Module, sizes: Sequence[int]) -> None:
        self.names = tuple(names)
        self.members = tuple(base_layer_of(getattr(parent, n)) for n in names)
        self.matmul = matmul  # nn.Linear or Int8WeightOnlyLinear over the fused tensors (not in the model's tree)
        self.sizes = list(sizes)  # each member's out_features, in order

    def current(self, parent: nn.Module) -> bool:
        """Whether ``parent``'s modules (under any LoRA wrapper) are still the ones fused."""
        return all(base_layer_of(getattr(parent, n)) is m for n, m in zip(self.names, self.members, strict=True))

    def __call__(self, x: torch.Tensor, gemv: bool = False) -> list[torch.Tensor]:
        """Each member's base output for x; ``gemv``: a float matmul runs through ``dense_gemv.linear`` (the GEMV
        kernel at one row, for a shape warmed up and found faster there; else ``F.linear``), or at 2-64 rows
        through the split-K kernel where ``dense_splitk.chosen`` (switched on and tuned)."""
        m = self.matmul
        if gemv and type(m) is nn.Linear:
            splitk = dense_splitk.chosen(x, m.weight, m.bias)
            y = (dense_splitk.splitk_linear if splitk else dense_gemv.linear)(x, m.weight, m.bias)
        else:
            y = m(x)
        return list(y.split(self.sizes, dim=-1))

    def silu_glu(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor | None:
        """For a gate/up pair of one width: ``silu(gate) * up`` of the base outputs in one launch where a one-row
        kernel takes x (the int8 GEMV, or with ``gemv`` the float GEMV where chosen: ``silu_glu`` in each), the
        values of the two steps bit for bit; else None (the caller runs the matmul, then the SiLU)."""
        m = self.matmul
        if len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]:
            return None
        if isinstance(m, Int8WeightOnlyLinear):
            return m.silu_glu(x)
        if gemv and type(m) is nn.Linear and dense_gemv.glu_chosen(x, m.weight, m.bias):
            return dense_gemv.silu_glu(x, m.weight, m.bias)
        return None

    def rope_append(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, write_pos: torch.Tensor, head_dim: int,
                    q_heads: int) -> torch.Tensor | None:
        """For an attention's q/k/v: the base projections rotated (q and k) and appended (k and v, at entry
        ``write_pos[0]`` of the layer's ``keys``/``values``) in the matmul's own launch where the int8 one-row
        kernel takes x (``int8_epilogues.rope_append``), the values of the matmul and ``kernels/rope_append.py``
        bit for bit; returns the rotated query ``[1, q_heads, 1, head_dim]``, or None (nothing written: the caller
        runs the two steps; always for a float matmul, whose GEMV has no such epilogue)."""
        m = self.matmul
        if self.names != QKV or not isinstance(m, Int8WeightOnlyLinear):
            return None
        return m.rope_append(x, cos, sin, keys, values, write_pos, head_dim, q_heads)

    def shrinks_in_launch(self) -> bool:
        """Whether ``with_shrink`` may run: an int8 matmul whose ``shrinks_in_launch`` holds, or a float one where
        ``dense_splitk.shrinks_in_launch`` does (both switches on): ``dense_splitk.layer_shrinks_in_launch``."""
        return dense_splitk.layer_shrinks_in_launch(self.matmul)

    def with_shrink(self, x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                    rank: int) -> tuple[list[torch.Tensor], LoraPartials] | None:
        """Each member's base output for x and a LoRA shrink of x's rows (``lora_a``: the members' A tables
        stacked, ``[G, R, S, in]``) in the split-K matmul's one launch (``dense_splitk.layer_with_shrink``: the
        int8 layer's or the float weight's; ask ``shrinks_in_launch`` first); None where the kernel does not take
        them (nothing launched)."""
        done = dense_splitk.layer_with_shrink(self.matmul, x, lora_a, slots, rank)
        if done is None:
            return None
        y, partials = done
        return list(y.split(self.sizes, dim=-1)), partials


def fused_outputs(fused: FusedLinear | None, parent: nn.Module, x: torch.Tensor,
                  gemv: bool = False) -> list[torch.Tensor] | None:
    """The base outputs of ``parent``'s fused modules for x, or None where they are not fused (the caller
    calls the modules themselves)."""
    return fused(x, gemv) if fused is not None and fused.current(parent) else None


@dataclass(frozen=True)
class LayerFusion:
    """One decoder layer's fused projections (None: that group stays unfused)."""

    qkv: FusedLinear | None = None
    gate_up: FusedLinear | None = None


def fuse_layers(layers: Iterable[nn.Module]) -> list[LayerFusion]:
    """Fuse q/k/v and gate/up in each pre-norm decoder layer (``self_attn``, ``mlp``) where they can be (see
    the module's docstring); the modules are changed in place to views of the fused tensors."""
    fusions = [LayerFusion(fuse(layer.self_attn, QKV), fuse_mlp(layer.mlp)) for layer in layers]
    if torch.cuda.is_available():  # hand the freed per-module blocks back, so that nothing stays reserved twice
        torch.cuda.empty_cache()
    log.info("fused base projections: q/k/v in %d of %d layers, gate/up in %d", sum(f.qkv is not None for f in
             fusions), len(fusions), sum(f.gate_up is not None for f in fusions))
    return fusions


def fuse_mlp(mlp: nn.Module) -> FusedLinear | None:
    """gate/up fused where the MLP's forward is Llama's ``down(act(gate(x)) * up(x))``, line for line (Mistral's,
    Qwen2/3's): the decoder then computes that from the split. GLM's MLP is one ``gate_up_proj`` already."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    return fuse(mlp, GATE_UP) if same_forward(type(mlp), LlamaMLP) else None


def fuse(parent: nn.Module, names: Sequence[str]) -> FusedLinear | None:
    """One ``FusedLinear`` for ``parent``'s modules ``names``, each module's tensors made views of its rows; None
    (nothing changed) when they are not all of one fusable kind."""
    members = [base_layer_of(getattr(parent, n)) for n in names if hasattr(parent, n)]
    if len(members) != len(names) or not _fusable(members):
        return None
    sizes = [int(m.weight.shape[0]) for m in members]
    weight = _concat_rows([m.weight.data for m in members])  # .data: Int8Params' plain int8 tensor
    bias = None if members[0].bias is None else _concat_rows([m.bias.data for m in members])
    if isinstance(members[0], Int8WeightOnlyLinear):
        matmul: nn.Module = Int8WeightOnlyLinear(weight, _concat_rows([m.scb for m in members]), bias)
    else:
        matmul = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        matmul.weight = nn.Parameter(weight, requires_grad=False)
        matmul.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    start = 0
    for member, size in zip(members, sizes, strict=True):
        rows = slice(start, start + size)
        _rebind(member, "weight", matmul.weight.data[rows])
        if bias is not None:
            _rebind(member, "bias", bias[rows])
        if isinstance(member, Int8WeightOnlyLinear):
            _rebind(member, "scb", matmul.scb[rows])
        start += size
    return FusedLinear(parent, names, matmul, sizes)


def _fusable(members: Sequence[nn.Module]) -> bool:
    """All of one fusable type, with one input size, weight dtype and device, row-major weights, and all with
    a bias of one dtype or none (int8: row scales of one dtype too)."""
    kind = type(members[0])
    if kind not in _FUSABLE or any(type(m) is not kind for m in members):
        return False

    def signature(m: nn.Module) -> tuple:
        w, b, scb = m.weight.data, m.bias, getattr(m, "scb", None)
        return (w.shape[1], w.dtype, w.device, w.is_contiguous(), None if b is None else b.dtype,
                None if scb is None else scb.dtype)

    if len({signature(m) for m in members}) != 1 or not members[0].weight.is_contiguous():
        return False
    dtype = members[0].weight.dtype
    return dtype == torch.int8 if kind is Int8WeightOnlyLinear else dtype.is_floating_point


def _concat_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tensors`` (contiguous, of one dtype, equal but for their first size) as one, in order: a view of
    their own memory when they already lie there back to back, else a new tensor with each copied in."""
    first = tensors[0]
    for t, after in zip(tensors, tensors[1:], strict=False):
        if (t.untyped_storage().data_ptr() != after.untyped_storage().data_ptr()
                or t.data_ptr() + t.numel() * t.element_size() != after.data_ptr()):
            return torch.cat([each.detach() for each in tensors])
    rows = sum(int(t.shape[0]) for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _rebind(module: nn.Module, name: str, view: torch.Tensor) -> None:
    """``module.<name>`` := ``view`` (a parameter stays a parameter, of the same ``requires_grad``; a buffer
    stays a buffer); the old tensor is dropped."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(view, requires_grad=old.requires_grad))
    else:
        setattr(module, name, view)


def int8_layers(fusions: Iterable[LayerFusion]) -> list[Int8WeightOnlyLinear]:
    """The fused int8 matmuls, whose shapes (``[q + k + v, in]``, ``[gate + up, in]``) the int8 kernel must
    be tuned for before any CUDA graph capture (``int8_linear.warm_up``)."""
    return [f.matmul for fusion in fusions for f in (fusion.qkv, fusion.gate_up)
            if f is not None and isinstance(f.matmul, Int8WeightOnlyLinear)]
