"""A fused RMSNorm: one Triton kernel launch instead of transformers' ~8 small kernels (issue 6).

transformers' ``LlamaRMSNorm.forward`` (the same in 5.17 and 5.24, and in ``MistralRMSNorm`` and
``Qwen2RMSNorm``)::

    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + variance_epsilon)
    return weight * h.to(input_dtype)

runs as separate kernels (cast, pow, mean, add, rsqrt, mul, cast, mul); a Llama-2-7B decode step has 65
norms (2 a layer and the final one), about a tenth of the batch-1 step's device time on an H200. The kernel
here does the same math in one pass over each row, in registers: fp32 sum of squares, times ``1/N``, plus
eps, ``rsqrt``; ``x * r`` rounded to the input dtype (as transformers rounds it before the weight multiply);
then the product with the weight in fp32, rounded once to the output dtype. The output dtype is
``torch.promote_types(weight.dtype, x.dtype)``, as ``weight * h.to(input_dtype)`` gives it; and a bf16 or
fp16 product in torch is also computed in fp32 and rounded once, so only the reduction order and ``rsqrt``'s
last bit can differ from transformers (an output differs then by one ulp of its dtype at most, and rarely).

Gemma-style norms (``x * (1 + weight)``, cast after the weight multiply) are different math and are not
swapped: ``use_fused_rms_norm`` only replaces the classes named in ``FUSABLE_NORMS``.

One program per row (rows = every leading dimension flattened), the row loaded once and kept in registers
(16 to 32 elements a thread): hidden sizes up to ``MAX_HIDDEN`` (16384). ``FusedRMSNorm`` runs the eager
math for longer rows.

CUDA graphs: no host sync, no value-dependent shape; the output is a ``torch.empty`` (the graph's pool
under capture). The kernel compiles at the first call for each (dtypes, hidden size, row stride alignment):
make that call (an eager forward) before capturing. The number of rows is the grid only, so one
compilation serves every batch size.

Triton is imported on first use (the daemon runs without it on the CPU): importing this module does not
import it. With ``TRITON_INTERPRET=1`` (read at each call) the kernel runs on CPU tensors through Triton's
interpreter (the tests use it). Elsewhere (CPU tensors without the interpreter, fp64, or autograd wanting a
gradient) ``FusedRMSNorm`` runs transformers' eager math instead.
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

# Classes whose forward is exactly the math above (transformers 5.17 and 5.24). Matched by class name, so
# that model modules need not be imported.
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
MAX_HIDDEN = 16384  # the longest row the kernel takes (kept in registers: 32 fp32 a thread at 16 warps)
# With an OutputDelta, one program streams the row's whole B, [BLOCK_R, BLOCK] elements: at most 64 Ki (rank 16 at
# hidden 4096, 128 KB of bf16), past which the expand's own launch (16 programs a row there) is kept. FOLD_CHUNK
# columns of it a step at FOLD_WARPS warps. ptxas for sm_90, with the 16-divisible pointers and sizes Triton
# specializes at run time, at rank 16: 4096 columns (a 4096-wide row in one step) take 95 registers a thread, no
# spill, 16 loads of 16 bytes in flight a thread, and each column's sum over the rank within its thread; 1024
# columns spread the rank rows over 4 warps, whose sums then cross shared memory (55 barriers a row, not 7).
MAX_FOLD_ELEMS = 65536
FOLD_WARPS = 16
FOLD_CHUNK = 4096
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` as a module global, as Triton wants.
triton = None
tl = None


def fused_rms_norm_available(device: torch.device | str) -> bool:
    """True when the kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


@functools.cache
def _cuda_kernel_runs(device: torch.device) -> bool:
    """``fused_rms_norm_available`` for a CUDA device, without the interpreter, asked once per device."""
    return fused_rms_norm_available(device)


# ---------------------------------------------------------------------------------------------- kernel
# Only Triton builtins are called (``tl.reduce`` with ``_sum_combine``, not the library's ``@triton.jit``
# ``tl.sum``): library functions are made compiled-only when Triton is imported without TRITON_INTERPRET,
# and this lets the interpreter be switched on later (as in int8_matmul).


def _rms_norm_rows(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, N, stride_x, stride_r, stride_y, stride_s,  # noqa: N803
                   inv_n, eps, b_ptr, slot_ptr, p_ptr, rank, splits, stride_br, stride_bs, stride_ps, stride_slot,
                   BLOCK: tl.constexpr, ADD: tl.constexpr, ROUND_X: tl.constexpr, ROUND_Y: tl.constexpr,
                   LORA: tl.constexpr = False, BLOCK_R: tl.constexpr = 16, BLOCK_S: tl.constexpr = 1,
                   CHUNK: tl.constexpr = 512, USE_PDL: tl.constexpr = False, DONE: tl.constexpr = False, d_ptr=None,
                   stride_d=0):
    """Row ``program_id(0)`` (``N <= BLOCK`` elements, kept in registers): ``y = w * (x * rsqrt(mean(x * x)
    + eps)).to(x.dtype)``, fp32 inside, stored in y's dtype. ``ADD``: first ``x = x + r`` (the residual
    stream plus a layer's output, rounded to x's dtype as torch's sum is), stored at ``s``, and normed.

    ``LORA`` (with ``ADD``; ``OutputDelta``): first ``r = r + (sum over s of p[s, row, :rank]) @ B[:rank, slot,
    :]`` in fp32, rounded to r's dtype, as ``lora_bgmv``'s expand adds it in place (a row on slot 0 keeps r
    as it is): the expand's launch folded in. It goes ``CHUNK`` columns at a time (a ``[BLOCK_R, CHUNK]`` tile of
    B: one step for rows up to ``FOLD_CHUNK``, more for wider ones), each chunk's ``r + delta`` stored at ``s``,
    then read back whole after a barrier (``s`` is overwritten with the sum next; r itself is not written). The
    slot and B's first chunk (no kernel writes either) are loaded before the PDL wait, so those bytes stream while
    the layer before still ends. ``DONE``: the delta's fp32 sums already computed (``d``, ``[rows, N]``: the
    layer's matmul launch did, ``int8_expand.py``), added in their place, no B or partials read.

    ``ROUND_X`` / ``ROUND_Y`` (the interpreter only, for bf16 x / y): round fp32 to bf16 precision to nearest
    even by hand. The interpreter's fp32 -> bf16 cast truncates (Triton 3.9), while the GPU's rounds to
    nearest even, as torch does; a value already of bf16 precision then converts exactly. (No NaN handling:
    tests only.)"""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if LORA:  # the slot (a step input) and B's first chunk (no kernel writes B) in flight before the PDL wait
        slot = tl.load(slot_ptr + row * stride_slot).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < tl.where(slot != 0, rank, 0)  # a base row (slot 0) loads no B and no partial
        if not DONE:
            bs = b_ptr + slot * stride_bs + rr.to(tl.int64)[:, None] * stride_br
            c0 = tl.arange(0, CHUNK)
            b_first = tl.load(bs + c0[None, :], mask=r_ok[:, None] & (c0 < N)[None, :], other=0.0,
                              eviction_policy="evict_first")
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        if LORA:  # r + its delta, chunk by chunk (a [BLOCK_R, CHUNK] tile of B at a time), into s first
            if not DONE:
                rs = tl.arange(0, BLOCK_S)
                ps = p_ptr + rs[:, None] * stride_ps + row * BLOCK_R + rr[None, :]
                xa = tl.reduce(tl.load(ps, mask=(rs < splits)[:, None] & r_ok[None, :], other=0.0), 0,
                               tl.standard._sum_combine)  # [BLOCK_R], the row's partials summed over the splits
            for c in tl.static_range(BLOCK // CHUNK):
                cc = c * CHUNK + tl.arange(0, CHUNK)
                c_ok = cc < N
                r_c = tl.load(r_ptr + row * stride_r + cc, mask=c_ok, other=0.0).to(tl.float32)
                if DONE:
                    e = r_c + tl.load(d_ptr + row * stride_d + cc, mask=c_ok, other=0.0)
                else:
                    if c == 0:
                        b_c = b_first
                    else:
                        b_c = tl.load(bs + cc[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0,
                                      eviction_policy="evict_first")
                    e = r_c + tl.reduce(b_c.to(tl.float32) * xa[:, None], 0, tl.standard._sum_combine)
                if ROUND_X:
                    eb = e.to(tl.uint32, bitcast=True)
                    e = ((eb + 0x7FFF + ((eb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
                tl.store(s_ptr + row * stride_s + cc, tl.where(slot != 0, e, r_c).to(s_ptr.dtype.element_ty),
                         mask=c_ok)
            tl.debug_barrier()  # s's writes seen by every thread of the program (bar.sync orders global memory)
            d = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            d = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = h + d
        if ROUND_X:
            b = h.to(tl.uint32, bitcast=True)
            h = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(s_ptr + row * stride_s + cols, h.to(s_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.reduce(h * h, 0, tl.standard._sum_combine) * inv_n
    h = h * tl.rsqrt(var + eps)
    if ROUND_X:
        b = h.to(tl.uint32, bitcast=True)
        h = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:  # transformers rounds to the input dtype before the weight multiply
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = w * h
    if ROUND_Y:
        b = y.to(tl.uint32, bitcast=True)
        y = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _triton():
    """Import Triton (once) into this module's globals, where the kernel's body finds ``tl``."""
    return triton_into(globals())


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET when it
    wraps the function, so building lazily lets the interpreter be switched on at run time)."""
    return _triton().jit(_rms_norm_rows)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n`` elements: the next power of two; 512 elements a warp (16 a
    thread), 1 to 16 warps (4096 -> 8, 8192 and 16384 -> 16)."""
    block = triton.next_power_of_2(n)
    return block, min(16, max(1, block // 512))


# ---------------------------------------------------------------------------------------------- wrappers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``, verbatim (where no kernel runs, and the reference)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)).to(x.dtype)`` through the kernel, in
    ``torch.promote_types(weight.dtype, x.dtype)`` with x's shape. ``x``: ``[..., N]`` (N <= ``MAX_HIDDEN``)
    fp32, bf16 or fp16 on a CUDA device (or any device under TRITON_INTERPRET=1), any strides (copied only
    when the last dimension is not contiguous or the leading ones cannot be flattened into one row stride);
    ``weight``: ``[N]``, fp32, bf16 or fp16. No gradient (serving only)."""
    return _launch(x, None, weight, eps)[1]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       delta: OutputDelta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (both of one dtype and shape; rounded as torch's sum) and ``fused_rms_norm(s)``, in
    one launch: a decoder layer's residual add and the norm after it (two kernels, and a re-read of ``s``,
    eagerly). Returns ``(s, the norm of s)``. ``delta``: ``residual``'s LoRA delta, added to it first as
    ``lora_bgmv``'s expand adds it (``OutputDelta``; ``delta.fits(residual)`` must hold); ``residual`` itself is
    not written."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x ({list(x.shape)} {x.dtype}), got {list(residual.shape)} "
                         f"{residual.dtype}")
    if delta is not None and not delta.fits(residual):
        raise ValueError(f"the LoRA delta ({list(delta.lora_b.shape)} B, {list(delta.partials.p.shape)} partials) "
                         f"does not fit the layer's output {list(residual.shape)}")
    return _launch(x, residual, weight, eps, delta)  # type: ignore[return-value] - s is a tensor when adding


@dataclass(frozen=True)
class OutputDelta:
    """A layer output's LoRA delta not yet added: at a decode step, o_proj's (its shrink done in the decode
    attention's merge, ``adapters/lora_folds.py``), for the post-attention add + norm to add first, as
    ``lora_bgmv``'s expand would (the row's partials summed over the splits, times its slot's B, added in fp32 and
    rounded to the output's dtype): the expand's launch saved. One program a row reads the row's whole
    ``[rank, out]`` B (128 KB at rank 16 and out 4096, where the expand spreads it over 16 programs) before
    its PDL wait; on the H200 that beat the expand's own launch at 1 to 64 rows (the decoder's
    ``NORM_FOLD_MIN_ROWS``). Where the kernel runs compiled, the sums
    may differ from the expand's in fp32's last bits (another reduction layout), so a row's tokens can differ
    from the same row's at few rows as any batch-size change of kernels can (bench/NOTES.md, batch invariance)."""

    partials: LoraPartials  # one member: p [1, splits, rows, BLOCK_R]
    lora_b: torch.Tensor  # [R, slots, out], pre-scaled
    # the delta's fp32 sums, [rows, out], where the layer's matmul launch already computed them (int8_expand.py):
    # then added as they are, and neither B nor the partials read again
    done: torch.Tensor | None = None

    def fits(self, residual: torch.Tensor) -> bool:
        """Whether the kernel takes it with this output: one token a row, B's columns contiguous and as wide,
        fp32/bf16/fp16, and the row's B tile within ``MAX_FOLD_ELEMS`` (kept in registers)."""
        p, b, n, d = self.partials.p, self.lora_b, residual.shape[-1], self.done
        if d is not None and (d.shape != (p.shape[2], n) or d.dtype != torch.float32 or d.stride(1) != 1
                              or d.device != residual.device):
            return False
        return (p.shape[0] == 1 and p.shape[2] == residual.numel() // max(n, 1) and b.dim() == 3
                and b.shape[2] == n and b.stride(2) == 1 and b.dtype in _DTYPES and 0 < n <= MAX_HIDDEN
                and self.partials.block_r * (1 << (n - 1).bit_length()) <= MAX_FOLD_ELEMS
                and self.partials.slots.shape == (p.shape[2],) and b.device == residual.device)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            delta: OutputDelta | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    n = x.shape[-1]
    if not 0 < n <= MAX_HIDDEN:
        raise ValueError(f"the kernel takes rows of 1 to {MAX_HIDDEN} elements, got {n}")
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}] (x's last dimension), got {list(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(f"x and weight must be fp32, bf16 or fp16, got {x.dtype} and {weight.dtype}")
    interpret = interpreting()
    kernel = _kernel(interpret)
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else None
    rows = x2.shape[0]
    if rows == 0:
        return s, y
    block, warps = _launch_config(n)
    kernel[(rows,)](x2, r2, w, y, s if s is not None else y, n, x2.stride(0), r2.stride(0), n, n, 1.0 / n,
                    float(eps), *_delta_arguments(delta, x2), BLOCK=block, ADD=residual is not None,
                    ROUND_X=interpret and x.dtype == torch.bfloat16, ROUND_Y=interpret and y.dtype == torch.bfloat16,
                    num_warps=warps if delta is None else FOLD_WARPS, **_delta_sizes(delta, block),
                    **pdl_launch(x.device))
    return s, y


def _delta_arguments(delta: OutputDelta | None, x2: torch.Tensor) -> tuple:
    """The kernel's LoRA arguments: B, the slots, the partials, the rank and splits and their strides (x's
    row in every pointer's place where there is no delta: never read)."""
    if delta is None:
        return (x2, x2, x2, 0, 0, 0, 0, 0, 0)
    b, p, slots = delta.lora_b, delta.partials.p, delta.partials.slots
    return (b, slots, p, delta.partials.rank, delta.partials.splits, b.stride(0), b.stride(1), p.stride(1),
            slots.stride(0))


def _delta_sizes(delta: OutputDelta | None, block: int) -> dict:
    """The kernel's LoRA constexprs, and the delta's sums where already done (none without a delta)."""
    chunk = min(FOLD_CHUNK, block)
    if delta is None:
        return {}
    done = {} if delta.done is None else {"DONE": True, "d_ptr": delta.done, "stride_d": delta.done.stride(0)}
    return {"LORA": True, "BLOCK_R": delta.partials.block_r, "BLOCK_S": delta.partials.block_s, "CHUNK": chunk,
            **done}


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``[rows, n]`` with unit stride along n: a view where the leading dimensions allow one row
    stride, else a copy."""
    return (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, n)


def _epsilon(module: nn.Module) -> float:
    """The module's epsilon: ``variance_epsilon`` (Llama, Mistral, Qwen2), else ``eps``."""
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if eps is not None:
            return float(eps)
    raise ValueError(f"{type(module).__name__} has neither variance_epsilon nor eps")


class FusedRMSNorm(nn.Module):
    """transformers' Llama RMSNorm through one Triton kernel. ``weight`` is the original module's own
    parameter (shared, not copied: swapping costs no memory, and the state dict keeps its key ``weight``).

    The kernel runs when it can (``x`` on a CUDA device where ``fused_rms_norm_available``, or
    TRITON_INTERPRET set; fp32/bf16/fp16; a hidden size up to ``MAX_HIDDEN``; no gradient wanted);
    otherwise the eager math, identical to transformers'."""

    def __init__(self, weight: nn.Parameter, eps: float = 1e-6) -> None:
        super().__init__()
        if weight.dim() != 1:
            raise ValueError(f"weight must be 1-D [hidden], got {list(weight.shape)}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = float(eps)

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedRMSNorm:
        """Wrap a Llama-style RMSNorm (its ``weight`` and ``variance_epsilon``, or ``eps``) without copying."""
        return cls(module.weight, _epsilon(module))

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        if x.dtype not in _DTYPES or self.weight.dtype not in _DTYPES or not 0 < x.shape[-1] <= MAX_HIDDEN:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False  # the kernel has no backward: let autograd see the eager ops
        return interpreting() or (x.is_cuda and _cuda_kernel_runs(x.device))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._kernel_runs(hidden_states):
            return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return rms_norm_reference(hidden_states, self.weight, self.variance_epsilon)

    def add_forward(self, hidden_states: torch.Tensor, residual: torch.Tensor,
                    delta: OutputDelta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, self(s))`` for ``s = hidden_states + residual``: one kernel where it runs (the same tensors as
        the two eager steps), else those steps. ``delta``: residual's LoRA delta to add first, in the kernel
        (``takes`` must hold)."""
        if delta is not None or self.takes(hidden_states, residual):
            return fused_add_rms_norm(hidden_states, residual, self.weight, self.variance_epsilon, delta)
        summed = hidden_states + residual
        return summed, self(summed)

    def takes(self, hidden_states: torch.Tensor, residual: torch.Tensor, delta: OutputDelta | None = None) -> bool:
        """Whether ``add_forward`` runs the kernel for these (with ``delta`` added in it, where given)."""
        return (self._kernel_runs(hidden_states) and residual.shape == hidden_states.shape
                and residual.dtype == hidden_states.dtype and (delta is None or delta.fits(residual)))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def use_fused_rms_norm(model: nn.Module, names: tuple[str, ...] = FUSABLE_NORMS) -> int:
    """Replace (in place) every submodule of ``model`` whose class name is in ``names`` (by default
    ``FUSABLE_NORMS``: Llama's, Mistral's, Qwen2's RMSNorm, whose forward is the kernel's math) by a
    ``FusedRMSNorm`` sharing its weight; returns how many modules were replaced. Module names and the state
    dict do not change; a norm shared by several parents stays one shared module. ``model`` itself is not
    replaced. Check ``fused_rms_norm_available(device)`` first: where the kernel cannot run the new modules
    run the eager math (correct, not faster)."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child).__name__ in names]  # collect first: do not mutate the tree while walking it
    fused: dict[int, FusedRMSNorm] = {}
    for parent, name, child in found:
        if id(child) not in fused:
            fused[id(child)] = FusedRMSNorm.from_module(child)
        setattr(parent, name, fused[id(child)])
    return len(fused)
