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

CUDA graphs: no host sync; the only allocation is the output's ``torch.empty``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .support import interpreting, pdl_launch, triton_available, triton_into

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # columns a program: 2 KB of bf16 a tensor, 8 elements a thread at 4 warps

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
              USE_PDL: tl.constexpr = False):
    """Columns ``program_id(1)`` of row ``program_id(0)``: ``o = silu(g) * u``, rounded as torch rounds."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.load(g_ptr + r * stride_gr + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + r * stride_ur + cols, mask=mask, other=0.0).to(tl.float32)
    x = g.to(tl.float32)
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
    module = triton_into(globals())
    if globals()["libdevice"] is None:
        from triton.language.extra import libdevice as lib

        globals()["libdevice"] = lib
    return module


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


def fits(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether ``silu_mul`` takes these: the same shape and dtype (one of ``_DTYPES``), on one device, unit
    column strides, each viewable as rows without a copy."""
    return (gate.shape == up.shape and gate.dim() >= 1 and gate.dtype == up.dtype and gate.dtype in _DTYPES
            and gate.device == up.device and gate.stride(-1) == 1 and up.stride(-1) == 1
            and _rows(gate) is not None and _rows(up) is not None)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` (``fits`` must hold), a new contiguous tensor of ``gate``'s shape and dtype."""
    g, u = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    rows, n = g.shape
    if out.numel() == 0:
        return out
    o = out.view(rows, n)
    interpret = interpreting()
    _kernel(interpret)[(rows, _triton().cdiv(n, BLOCK))](
        g, u, o, n, g.stride(0), u.stride(0), o.stride(0), BLOCK=BLOCK, INTERPRETED=interpret,
        ROUND_BF16=interpret and gate.dtype == torch.bfloat16, num_warps=4, **pdl_launch(gate.device))
    return out
