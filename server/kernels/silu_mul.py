"""A Llama-style MLP's ``silu(gate) * up`` in one Triton launch (issue 18).

torch runs it as two kernels: ``F.silu`` writes ``silu(gate)`` in the activations' dtype, then the product
reads it back with ``up``. At a decode step each is a launch of ~1.5 us for ~40 KB (a 7B model's 11008-wide
MLP, one row), 64 launches a step over 32 layers. This kernel reads ``gate`` and ``up`` once and writes the
product: program ``(r, c)`` does columns ``[c * BLOCK, (c + 1) * BLOCK)`` of row ``r``. ``gate`` and ``up`` may be
the two halves of the fused gate/up projection's output (row strides of their own, unit column stride).

Exactness: the same roundings as torch. torch's CUDA SiLU computes ``x / (1 + exp(-x))`` in fp32 for bf16 and
fp16 inputs (``exp`` is CUDA's ``expf``, the division IEEE) and rounds to the dtype; the product is an fp32
product of the two rounded to the dtype. Here ``libdevice.exp`` is the same ``expf``, ``div_rn`` the IEEE
division, and each result is rounded where torch rounds, so the output equals torch's bit for bit (the GPU
tests compare them). In Triton's interpreter (the CPU tests) numpy computes ``exp`` and the division, and the
fp32 -> bf16 cast truncates (Triton 3.9), so ``ROUND_BF16`` rounds to nearest even by hand, as
``rope_append.py`` does; there the result is within one bf16 rounding of torch's.

With LoRA on gate and up (``GluDeltas``: their one shrink's partials and B tables, ``adapters/lora_folds.py``),
each program first adds its columns' deltas as ``lora_bgmv``'s expand would, which saves the expand's launch a
layer at decode steps.

CUDA graphs: no host sync; the only allocation is the output's ``torch.empty``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .support import interpreting, pdl_launch, triton_available, triton_into

if TYPE_CHECKING:
    from .lora_bgmv import LoraPartials

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # columns a program: 2 KB of bf16 a tensor, 8 elements a thread at 4 warps
# With LoRA deltas (GluDeltas) a program also holds gate's and up's B tiles, [BLOCK_R, LORA_BLOCK] each (8 KB of bf16
# at rank 16, as the expand's program reads): ptxas for sm_90 with the 16-divisible pointers and sizes Triton
# specializes at run time gives 128 columns at 1 warp 96 registers a thread, no spill, 16 loads of 16 bytes in flight,
# each column's sum over the rank within its thread; more warps spread the rank rows over warps (256 columns at 4
# warps: 31 barriers a program for the sums, against 1)
LORA_BLOCK = 128
LORA_WARPS = 1

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` and ``libdevice`` as module globals.
triton = None
tl = None
libdevice = None


def silu_mul_available(device: torch.device | str) -> bool:
    """True when the kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


def is_silu(act: nn.Module) -> bool:
    """Whether ``act`` computes ``F.silu``: torch's module, or transformers' ``SiLUActivation`` (what
    ``ACT2FN["silu"]`` gives; its forward is ``F.silu``)."""
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and type(act).__module__ == "transformers.activations")


# ---------------------------------------------------------------------------------------------- kernel


def _silu_mul(g_ptr, u_ptr, o_ptr, N, stride_gr, stride_ur, stride_or,  # noqa: N803 (Triton's naming)
              BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, ROUND_BF16: tl.constexpr,
              USE_PDL: tl.constexpr = False, p_ptr=None, bg_ptr=None, bu_ptr=None, slot_ptr=None, rank=0, splits=0,
              stride_pg=0, stride_ps=0, stride_bgr=0, stride_bgs=0, stride_bur=0, stride_bus=0,
              LORA: tl.constexpr = False, BLOCK_R: tl.constexpr = 16, BLOCK_S: tl.constexpr = 16):
    """Columns ``program_id(1)`` of row ``program_id(0)``: ``o = silu(g) * u``, rounded as torch rounds.

    ``LORA`` (``GluDeltas``): first g and u each get their LoRA delta as ``lora_bgmv``'s expand adds it (the row's
    partials of member 0 (gate) or 1 (up) summed over the splits, times its slot's B columns, added in fp32 and
    rounded to the dtype; a row on slot 0 keeps g and u as they are). The slot and both B tiles (no kernel writes
    them) are loaded before the PDL wait."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    if LORA:
        slot = tl.load(slot_ptr + r).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads no B and no partial
        b_mask = r_ok[:, None] & mask[None, :]
        b_g = tl.load(bg_ptr + slot * stride_bgs + rr.to(tl.int64)[:, None] * stride_bgr + cols[None, :], mask=b_mask,
                      other=0.0, eviction_policy="evict_first")
        b_u = tl.load(bu_ptr + slot * stride_bus + rr.to(tl.int64)[:, None] * stride_bur + cols[None, :], mask=b_mask,
                      other=0.0, eviction_policy="evict_first")
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.load(g_ptr + r * stride_gr + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + r * stride_ur + cols, mask=mask, other=0.0).to(tl.float32)
    x = g.to(tl.float32)
    if LORA:
        rs = tl.arange(0, BLOCK_S)
        ps = p_ptr + rs[:, None] * stride_ps + r * BLOCK_R + rr[None, :]
        p_mask = (rs < splits)[:, None] & r_ok[None, :]
        x_g = tl.reduce(tl.load(ps, mask=p_mask, other=0.0), 0, tl.standard._sum_combine)  # [BLOCK_R]
        x_u = tl.reduce(tl.load(ps + stride_pg, mask=p_mask, other=0.0), 0, tl.standard._sum_combine)
        xd = x + tl.reduce(b_g.to(tl.float32) * x_g[:, None], 0, tl.standard._sum_combine)
        ud = u + tl.reduce(b_u.to(tl.float32) * x_u[:, None], 0, tl.standard._sum_combine)
        if ROUND_BF16:  # each rounded to the dtype as the expand's store rounds it
            xb = xd.to(tl.uint32, bitcast=True)
            xd = ((xb + 0x7FFF + ((xb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            ub = ud.to(tl.uint32, bitcast=True)
            ud = ((ub + 0x7FFF + ((ub >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            xd = xd.to(g.dtype).to(tl.float32)
            ud = ud.to(g.dtype).to(tl.float32)
        x = tl.where(slot != 0, xd, x)
        u = tl.where(slot != 0, ud, u)
    if INTERPRETED:  # numpy's exp and IEEE division (libdevice is the GPU's)
        s = x / (1.0 + tl.exp(-x))
    else:
        s = tl.math.div_rn(x, 1.0 + libdevice.exp(-x))
    if ROUND_BF16:  # round to nearest even by hand (the interpreter's cast truncates)
        sb = s.to(tl.uint32, bitcast=True)
        s = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y = s * u
        yb = y.to(tl.uint32, bitcast=True)
        y = ((yb + 0x7FFF + ((yb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        s = s.to(g.dtype).to(tl.float32)  # F.silu's output, in the activations' dtype
        y = s * u
    tl.store(o_ptr + r * stride_or + cols, y.to(o_ptr.dtype.element_ty), mask=mask)


def _triton():
    """Import Triton (once) into this module's globals, with ``libdevice``, where the kernel's body finds them."""
    return triton_into(globals(), libdevice=True)


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    return _triton().jit(_silu_mul)


# ---------------------------------------------------------------------------------------------- wrapper


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a ``[rows, N]`` view (no copy), or None where its strides do not allow one."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


@dataclass(frozen=True)
class GluDeltas:
    """An MLP's gate and up LoRA deltas still to add at a decode step: their one shrink's partials
    (``lora_bgmv.lora_shrink`` over the two as one group, gate then up) and their B tables (``[R, slots, out]``,
    pre-scaled). ``silu_mul`` adds them as ``lora_bgmv.lora_expand_`` would: the expand's launch saved a layer."""

    partials: LoraPartials
    gate_b: torch.Tensor
    up_b: torch.Tensor

    def fits(self, gate: torch.Tensor, up: torch.Tensor) -> bool:
        """Whether ``silu_mul`` can add these (``fits(gate, up)`` holding too): two members, one token a row, the
        tables as wide as the outputs with unit column strides, a float dtype, on their device."""
        p = self.partials.p
        return (p.shape[0] == 2 and p.is_contiguous() and gate.dim() >= 1 and p.shape[2] == gate.numel() // max(
                    gate.shape[-1], 1)
                and all(b.dim() == 3 and b.shape[2] == gate.shape[-1] and b.stride(2) == 1 and b.dtype in _DTYPES
                        and b.device == gate.device for b in (self.gate_b, self.up_b)))


def fits(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether ``silu_mul`` takes these: the same shape and dtype (one of ``_DTYPES``), on one device, unit
    column strides, each viewable as rows without a copy."""
    return (gate.shape == up.shape and gate.dim() >= 1 and gate.dtype == up.dtype and gate.dtype in _DTYPES
            and gate.device == up.device and gate.stride(-1) == 1 and up.stride(-1) == 1
            and _rows(gate) is not None and _rows(up) is not None)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, lora: GluDeltas | None = None) -> torch.Tensor:
    """``F.silu(gate) * up`` (``fits`` must hold), a new contiguous tensor of ``gate``'s shape and dtype. ``lora``:
    each row's LoRA deltas added to gate and up first (``GluDeltas.fits`` must hold; gate and up themselves are
    left as they are)."""
    g, u = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    rows, n = g.shape
    if out.numel() == 0:
        return out
    o = out.view(rows, n)
    interpret = interpreting()
    block, warps = (BLOCK, 4) if lora is None else (LORA_BLOCK, LORA_WARPS)
    _kernel(interpret)[(rows, _triton().cdiv(n, block))](
        g, u, o, n, g.stride(0), u.stride(0), o.stride(0), BLOCK=block, INTERPRETED=interpret,
        ROUND_BF16=interpret and gate.dtype == torch.bfloat16, num_warps=warps, **pdl_launch(gate.device),
        **_lora_arguments(lora))
    return out


def _lora_arguments(lora: GluDeltas | None) -> dict:
    """The kernel's LoRA keywords for ``lora`` (none without it)."""
    if lora is None:
        return {}
    p, slots = lora.partials.p, lora.partials.slots
    return dict(p_ptr=p, bg_ptr=lora.gate_b, bu_ptr=lora.up_b, slot_ptr=slots, rank=lora.partials.rank,
                splits=lora.partials.splits, stride_pg=p.stride(0), stride_ps=p.stride(1),
                stride_bgr=lora.gate_b.stride(0), stride_bgs=lora.gate_b.stride(1), stride_bur=lora.up_b.stride(0),
                stride_bus=lora.up_b.stride(1), LORA=True, BLOCK_R=lora.partials.block_r,
                BLOCK_S=lora.partials.block_s)
