"""q, k and v's LoRA shrink and then its expand, both in their fused split-K matmul's launch (issue 18).

At a decode step of 32 rows on 32 adapters, q/k/v's shrink already runs as extra programs of the fused q/k/v
matmul (``int8_shrink.py``), and the rotary + append kernel after it reads q/k/v's B (12.6 MB a layer at rank 16)
to add their deltas (``rope_append.py``, ``QkvDeltas``). On the H200 that read takes about what it takes on the
H100 (+149 against +155 us a step, bench/NOTES.md, "Thirty-third session"): a 1-4 us burst in a grid of its own,
whose start costs the same on either card. Here the expand runs as more extra programs of the matmul's launch,
which stream B beside the matmul's last tiles and the shrink, into an fp32 ``[rows, N]`` buffer (each member's
sums at its columns of the fused output) that the rotary kernel adds in place of its own (``QkvDeltas.done``):
the same fp32 sums in the same order (bit for bit in the interpreter; compiled, a program's reduction layout may
differ in fp32's last bits).

An expand program needs its row's partials, which the shrink's programs of the same launch write. It takes its
unit by ticket (``int8_decode_kernels._int8_mm``'s ``CHAIN``): the extra programs number themselves in the order
they start, the first ``shrink_units`` run the shrink and release their row and member's counter, the rest read
their B tile and acquire it (an expand program waits for its own row and member's shrink, not the whole shrink).
A program so waits only on programs that have started, and they wait on nothing, whatever order the GPU starts a
grid's blocks in (no deadlock; the interpreter runs them one after another). The counters (int32) are zero before
a launch and zero after it, so CUDA graphs replay on them; two launches must not run at once on one device (the
engine's decode steps run on one stream).

Where it runs (``matmul_shrink_and_expand``; else None and the caller takes ``int8_shrink``'s launch): where that
launch runs, with the members' B tables of one float dtype, each ``[R, slots, width]`` with unit column stride,
the widths summing to the matmul's output. ``IN_MATMUL`` switches it for the engine (off until an A/B on the GPU:
``bench/pdl_bench.py --switch qkvexpand``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton

from .int8_matmul import small_m_with_extra
from .int8_shrink import shrink_launch
from .lora_bgmv import TILE_ELEMS, LoraPartials, _block_n
from .support import interpreting

# The engine's switch (dense_splitk.layer_with_shrink_and_expand): off until timed on the GPU.
IN_MATMUL = False
# B's elements one expand program reads (``BLOCK_R * E_BLOCK_N``), as int8_expand's o_proj programs: 1024 columns at
# rank 16.
PROGRAM_ELEMS = 4 * TILE_ELEMS
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_REFUSED: set[tuple] = set()  # launches Triton would not build: int8_shrink's launch serves them


# The launch's counters: the tickets taken, then each (row, member)'s shrink units released (at most 64 rows, 3
# members), padded to a power of two
COUNTERS = 256


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """The launch's ``COUNTERS`` counters on ``device``, zeros: made once a device and kept for the process (a CUDA
    graph captured with them replays on them; the kernel leaves them at zero)."""
    return torch.zeros(COUNTERS, device=device, dtype=torch.int32)


def counters(device: torch.device | str) -> torch.Tensor:
    """``_counters`` for ``device`` (a bare ``cuda`` read as the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _counters(device)


def tables_fit(tables: Sequence[torch.Tensor | None], widths: Sequence[int], members: int, rank: int,
               device: torch.device) -> bool:
    """Whether the expand takes these B tables (q's, k's, v's; None where no adapter targets it): one a member of
    the shrink (``members``), each ``[>= rank, slots, width]`` with unit column stride, one float dtype, on
    ``device``."""
    present = [(b, w) for b, w in zip(tables, widths, strict=True) if b is not None]
    return (len(tables) == 3 and len(present) == members and members > 0
            and all(b.dim() == 3 and b.shape[0] >= rank and b.shape[2] == w and b.stride(2) == 1
                    and b.dtype == present[0][0].dtype and b.dtype in _FLOATS and b.device == device
                    for b, w in present))


def matmul_shrink_and_expand(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None, bias: torch.Tensor | None,
                             lora_a: torch.Tensor, slots: torch.Tensor, rank: int,
                             tables: Sequence[torch.Tensor | None], widths: Sequence[int],
                             config: dict | None = None,
                             ) -> tuple[torch.Tensor, LoraPartials, torch.Tensor] | None:
    """``int8_shrink.matmul_and_shrink``'s two results and the expand's sums, ``[rows, N]`` fp32 (member m's
    ``(sum over splits of its partials)[:rank] @ B_m[:rank, slot]`` at its columns of y, the columns of a member
    no adapter targets left unwritten, a base row's 0), from one launch. ``tables``: q's, k's and v's B
    (``[R, slots, width]``, None where unwrapped), ``widths``: their outputs' widths in y's order. None where it
    does not run (the module docstring; nothing launched). ``config`` (tests): the matmul's launch kwargs."""
    n = cb.shape[0]
    if len(widths) != 3 or sum(widths) != n or not tables_fit(tables, widths, lora_a.shape[0], rank, x.device):
        return None
    launch = shrink_launch(x, cb, scb, bias, lora_a, slots, rank, config)
    if launch is None:
        return None
    x2, config, shrink, refusal, p = launch
    rows, block_r = x2.shape[0], shrink["BLOCK_R"]
    block_n = _block_n(block_r, PROGRAM_ELEMS)
    chunks = [triton.cdiv(w, block_n) if b is not None else 0 for b, w in zip(tables, widths, strict=True)]
    members = [sum(b is not None for b in tables[:i]) for i in range(3)]  # each one's index among the wrapped
    present = next(b for b in tables if b is not None)
    tabs = [b if b is not None else present for b in tables]  # an unwrapped one's stands in: no program reads it
    d = torch.empty((rows, n), device=x2.device, dtype=torch.float32)
    shrink_units = shrink.pop("units")
    expand_units = rows * sum(chunks)
    chain = dict(CHAIN=True, count_ptr=counters(x2.device), shrink_units=shrink_units, expand_units=expand_units,
                 eb_ptr=tabs[0], ebk_ptr=tabs[1], ebv_ptr=tabs[2], ed_ptr=d, stride_edm=d.stride(0),
                 stride_ebr=tabs[0].stride(0), stride_ebs=tabs[0].stride(1), stride_ebkr=tabs[1].stride(0),
                 stride_ebks=tabs[1].stride(1), stride_ebvr=tabs[2].stride(0), stride_ebvs=tabs[2].stride(1),
                 E_CQ=chunks[0], E_CK=chunks[1], E_CV=chunks[2], E_MQ=members[0], E_MK=members[1], E_MV=members[2],
                 E_NQ=widths[0], E_NK=widths[1], E_NV=widths[2], E_BLOCK_S=triton.next_power_of_2(p.shape[1]),
                 E_BLOCK_N=block_n, units=shrink_units + expand_units)
    y = small_m_with_extra(x2, cb, scb, bias, interpreting(), config, shrink | chain,
                           (*refusal, present.dtype, block_n), _REFUSED, "the shrink's launch and the rotary's expand")
    if y is None:
        return None
    return y.reshape(*x.shape[:-1], n), LoraPartials(p, slots, rank), d
