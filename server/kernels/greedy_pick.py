"""Each row's greedy token and finite check in one launch, a minimum length's ban on end-of-sequence included.

A decode step ends with ``sampling_ops.greedy_pick``: each row's argmax and whether all its logits are finite,
computed inside the step's CUDA graph so that a batch of greedy rows launches nothing more to choose its tokens.
In torch that is four kernels a step (argmax, isfinite, all, stack), and a row with a minimum length
(``min_new_tokens``: end-of-sequence ids at -inf until the row has that many tokens) needed the sampler's own
launches after the graph: a float copy of the logits, the ban, the argmax, the counters (~0.03 ms a one-row step
on the H200, bench/gap_bench.py). Here one program a row reads the row's logits once, ``BLOCK`` at a time (the
next block requested before the current one is used), and keeps, per lane, the largest value seen and its
column; end-of-sequence columns count as -inf where the row's ban flag is set. It writes ``[rows, 2]`` long:
the column of the row's largest value, the first such column on ties (``torch.argmax``'s choice), and 1 where
every logit is finite, else 0.

Exactness: comparisons of the logits' own values (bf16 and fp16 widen to fp32 exactly), so on a finite row the
token is ``sampling_ops.greedy_pick``'s bit for bit (the tests check ties, bans and every dtype). A row with a
NaN or an infinity is flagged, and its token is any in-range column (the engine ends such a row on its flag;
``torch.argmax`` would pick the first NaN).

CUDA graphs: no host sync; the only allocation is the output's ``torch.empty``. With ``TRITON_INTERPRET=1`` the
kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

import functools

import torch

from .support import interpreting, pdl_launch, triton_available, triton_into

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 4096  # logits a step of a program's loop: 16 a thread at 8 warps, 8 steps for a 32,000-token vocabulary
MAX_EOS = 8  # end-of-sequence ids the ban compares against (models have 1-3)

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` as a module global.
triton = None
tl = None


def greedy_pick_available(device: torch.device | str) -> bool:
    """True when the kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


# ---------------------------------------------------------------------------------------------- kernel
# Only Triton builtins are called (reductions through ``tl.reduce`` with the library's combine functions), so
# that the interpreter can be switched on later, as in the other kernels.


def _greedy_pick(logits_ptr, ban_ptr, eos_ptr, out_ptr, VOCAB, stride_row,  # noqa: N803 (Triton's naming)
                 N_EOS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Row ``program_id(0)``: ``out[row] = (first column of the largest logit, EOS columns at -inf where
    ``ban[row]``; 1 if every logit is finite else 0)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    banned = tl.load(ban_ptr + row) != 0  # a step input (the host's copy): read before the wait
    if USE_PDL:  # launched with PDL (support.pdl_enabled): see the kernels before it, then let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    base = logits_ptr + row * stride_row
    best = tl.full((BLOCK,), -float("inf"), tl.float32)
    best_col = tl.full((BLOCK,), 0, tl.int32)
    bad = tl.full((BLOCK,), 0, tl.int32)
    nxt = tl.load(base + cols, mask=cols < VOCAB, other=0.0)
    for start in range(0, VOCAB, BLOCK):
        col = start + cols
        live = col < VOCAB
        value = nxt.to(tl.float32)
        nxt = tl.load(base + col + BLOCK, mask=col + BLOCK < VOCAB, other=0.0)  # in flight while this one is used
        bad = tl.where(live & ((value - value) != 0.0), 1, bad)  # inf - inf and NaN - NaN are NaN
        if N_EOS > 0:
            is_eos = col < 0
            for j in tl.static_range(N_EOS):
                is_eos = is_eos | (col == tl.load(eos_ptr + j))
            value = tl.where(banned & is_eos, -float("inf"), value)
        # strictly larger: a lane keeps its earliest column on ties (its columns come in increasing order)
        take = live & (value > best)
        best = tl.where(take, value, best)
        best_col = tl.where(take, col, best_col)
    top = tl.reduce(best, 0, tl.standard._elementwise_max)
    # the first column holding the top value; a row with no value above -inf (every column banned or -inf)
    # gets column 0, as torch.argmax of an all -inf row does: every lane still holds its initial (-inf, 0)
    token = tl.reduce(tl.where(best == top, best_col, VOCAB), 0, tl.standard._elementwise_min)
    finite = tl.reduce(bad, 0, tl.standard._elementwise_max) == 0
    tl.store(out_ptr + row * 2, token.to(tl.int64))
    tl.store(out_ptr + row * 2 + 1, finite.to(tl.int64))


def _triton():
    """Import Triton (once) into this module's globals, where the kernel's body finds ``tl``."""
    return triton_into(globals())


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    # VOCAB and the row stride stay specialized: divisible by 16 (Llama's 32,000 and 128,256 are) lets the
    # loads be 16 bytes wide
    return _triton().jit(_greedy_pick)


# ---------------------------------------------------------------------------------------------- wrapper


def fits(logits: torch.Tensor, bans: torch.Tensor, eos: torch.Tensor) -> bool:
    """Whether ``greedy_pick`` takes these: ``[rows, vocab]`` logits of one of ``_DTYPES`` with a unit column
    stride, ``[rows]`` integer bans and at most ``MAX_EOS`` integer EOS ids, all on one device."""
    return (logits.dim() == 2 and logits.dtype in _DTYPES and logits.stride(1) == 1 and logits.shape[1] > 0
            and bans.shape == (logits.shape[0],) and not bans.is_floating_point() and bans.is_contiguous()
            and eos.dim() == 1 and eos.numel() <= MAX_EOS and not eos.is_floating_point() and eos.is_contiguous()
            and bans.device == logits.device == eos.device)


def greedy_pick(logits: torch.Tensor, bans: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """``sampling_ops.greedy_pick(logits, bans, eos)`` in one launch (``fits`` must hold): ``[rows, 2]`` long, each
    row's token (EOS ids banned where ``bans`` is nonzero) and finite flag."""
    rows, vocab = logits.shape
    out = torch.empty((rows, 2), device=logits.device, dtype=torch.long)
    if rows == 0:
        return out
    _kernel(interpreting())[(rows,)](logits, bans, eos, out, vocab, logits.stride(0), N_EOS=eos.numel(),
                                     BLOCK=BLOCK, num_warps=8, **pdl_launch(logits.device))
    return out
