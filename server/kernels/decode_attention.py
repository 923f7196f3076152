"""Decode-step attention over the key/value pool, split along the keys (issue 18).

At a decode step each row has one query a head and reads its own entries of the pool (``kv_pool.py``)
through an additive mask ``[rows, 1, 1, length]`` (0 where visible; the dtype's minimum past the row's
length and, in sliding-window layers, a window or more behind). ``F.scaled_dot_product_attention`` reads the
whole padded bucket for every row and, at one row, runs cuDNN's prefill kernel for a single query plus a
reduction kernel (~10 us a layer on the H200 for 512 entries, bench/NOTES.md). Here, "flash decoding":

* ``_attention_partials``: program ``(row * kv_heads + kv_head, split)`` loads ``CHUNK`` entries of the row's
  keys, values and mask once for the ``GROUP`` query heads that share that key/value head (grouped-query attention)
  and writes, for each, the chunk's running max ``m``, its sum of ``exp(score - m)`` ``l`` and its weighted
  sum of values ``acc`` (fp32). A chunk whose mask hides every entry (past the row's length: the padding of
  the length bucket) reads no key or value and writes ``l = 0``: rows shorter than the bucket read only what
  they see, so the cost follows each row's own length.
* ``_attention_combine``: program ``(row, head)`` merges the splits in a fixed order (``exp(m_s - max m)``
  weighted) and writes the output in the query's dtype. Or, with ``fused`` (the default at few rows: launch and
  dependency latency, not bytes, bound a step there), no second launch: each partials program, once its partials
  are stored, adds 1 to its (row, key/value head)'s counter (release-acquire, after a barrier of the program's
  threads), and the one that finds the other splits all counted merges them, its group's heads one by one, with
  the combine's operations in the combine's order (the same bits, whatever order the programs end in; the others'
  partials read past L1, ``.cg``), writes the output and sets the counter back to 0. The counters are a zeroed
  buffer kept per device and size (``counters``), so CUDA graphs replay on zeros.

Under PDL with ``fresh`` (the entry each row's append just wrote; the decoder gives it at one row,
``PREFETCH_ROWS``), the mask and the chunk's keys and values are read before the kernel waits for the append, and
only the new entry again after it.

With LoRA on o_proj (``OutputShrink``, ``adapters/lora_folds.py``), whichever program writes a head's output also
writes o_proj's shrink partial for it (head h's output is split h of o_proj's input): the shrink's launch saved.

Splits are fixed ``CHUNK``-entry ranges of the keys, and a split that sees nothing adds exact zeros, so a row's
result depends neither on the length bucket nor on what else shares its step. Scores, softmax and sums run in
fp32 from the stored dtype; with one query head a key/value head the probabilities stay fp32 (SDPA's kernels
round them to bf16 before their second matmul), while grouped heads (Llama 3, Mistral, Qwen) run both
products of the group on the tensor cores, the probabilities to ~fp32 precision (``_attention_partials``). Masked
entries weigh exactly 0, as in SDPA (the pool keeps them finite: see ``kv_pool.py``).

CUDA graphs: no host sync; the partials are ``torch.empty`` at each call, the counters made once a device and size
(best at an eager call before capture, a warm-up). Triton is imported on first use; with ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import decode_attention_kernels as kernel_source
from .decode_attention_kernels import _attention_combine, _attention_partials  # their source (tests compile them)
from .support import interpreting, pdl_launch, triton_available

if TYPE_CHECKING:
    from .lora_bgmv import LoraPartials

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 64  # entries a split: 64 x 128 x 2 bytes = 16 KB of keys and as much of values a program in bf16
# (32-entry splits at few rows were tried and lost with the fused merge: attention_bench at bbb044f, Llama-2-7B,
# us a layer, fused32 / fused64: 1 row 10.8 / 8.9, 2 rows 13.9 / 10.9, 4 rows 21.4 / 15.8; the last split merges
# twice the partials. Two launches at 1 row: split32 9.2 / split64 12.4.)
MAX_GROUP = 16  # query heads a key/value head (a program keeps each one's sums in registers)
MAX_HEAD_DIM = 256
# Splits the combine merges at a time, a loop over blocks of them past that; fixed (not sized to the splits) so
# that the sums' order does not depend on the length bucket either
COMBINE_BLOCK = 32
# The merge in the partials kernel by the last split to finish (one launch, ``fused``) where it paid on the H200
# (bench/attention_bench.py at 0e6c9f1, split64 -> fused64, rotary + append included, us a layer): one query head a
# key/value head and up to 256 (row, head) pairs, e.g. Llama-2-7B at 1 row -> 8.8 (split64 12.4 at 12c7032), 4 rows
# 19.2 -> 15.6, 8 rows 28.6 -> 26.9, but 32 rows 75.0 -> 82.9; with grouped heads (Llama-3-8B, one program merging
# its 4 heads one after the other) it lost at every size measured (1 row 7.0 -> 12.1, 32 rows 44.2 -> 52.2)
FUSE_MAX_PROGRAMS = 256
# Grouped heads attend here only up to this many rows; past it cuDNN's SDPA was faster on the H200
# (attention_bench at 0e6c9f1, Llama-3-8B, rotary + append included, us a layer, SDPA / split64: 1 row 10.2 / 7.0,
# 4 rows 11.2 / 11.7, 8 rows 13.9 / 15.4, 32 rows 28.2 / 44.2). One head a key/value head (Llama-2) stays here
# at every size (32 rows: 86.6 / 75.0).
MAX_GQA_ROWS = 2
# Rows up to which the chunk's keys and values are read before the PDL wait (``fresh``), one query head a
# key/value head. attention_bench at c36864f, H200, rotary + append included, us a layer, the default launch
# without / with it: Llama-2-7B 1 row 9.26 / 8.80, 8 rows 27.3 / 33.4, 32 rows 81.1 / 103.9; Llama-3-8B 1 row
# 6.9 / 7.9. Past one row the tile held in registers across the wait costs more than the wait hides.
PREFETCH_ROWS = 1


def decode_attention_available(device: torch.device | str) -> bool:
    """True when the kernels can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


def _triton():
    """Import Triton (once) into the kernels' module, where their bodies find ``tl``; returns ``triton``."""
    return kernel_source._triton()


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET)."""
    jit = _triton().jit
    return (jit(_attention_partials, do_not_specialize=["LENGTH", "SPLITS", "stride_ob", "stride_oh", "O_RANK"]),
            jit(_attention_combine, do_not_specialize=["SPLITS", "O_RANK"]))


# ---------------------------------------------------------------------------------------------- wrapper


def fits(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes these: one query a row (``q`` ``[rows, q_heads, 1, head_dim]``), keys
    and values ``[rows, kv_heads, length, head_dim]`` with q_heads a multiple of kv_heads (at most
    ``MAX_GROUP`` apart), an additive mask ``[rows, 1, 1, length]``, float dtypes, unit strides along the head."""
    if q.dim() != 4 or keys.dim() != 4 or mask.dim() != 4:
        return False
    rows, q_heads, queries, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    return (queries == 1 and dim <= MAX_HEAD_DIM and keys.shape[0] == rows and values.shape == keys.shape
            and keys.shape[3] == dim and kv_heads > 0 and q_heads % kv_heads == 0
            and q_heads // kv_heads <= MAX_GROUP and mask.shape == (rows, 1, 1, length) and length > 0
            and q.dtype in _DTYPES and keys.dtype in _DTYPES and values.dtype in _DTYPES
            and mask.dtype in _DTYPES and q.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1)


def faster_than_sdpa(rows: int, group: int, device: torch.device) -> bool:
    """Whether the decoder should attend with ``decode_attention`` rather than cuDNN's SDPA at ``rows`` rows and
    ``group`` query heads a key/value head, on a GPU (``MAX_GQA_ROWS``); under the interpreter always (the
    tests: no speed to choose by, every path checked)."""
    return device.type != "cuda" or group == 1 or rows <= MAX_GQA_ROWS


def prefetch_pays(rows: int, group: int) -> bool:
    """Whether the decoder should give ``decode_attention`` its ``fresh`` entries (the chunk read before the PDL
    wait), by ``PREFETCH_ROWS``."""
    return group == 1 and rows <= PREFETCH_ROWS


def fuse_merge(rows: int, kv_heads: int, group: int) -> bool:
    """Whether ``decode_attention`` merges in the partials kernel by default (``FUSE_MAX_PROGRAMS``)."""
    return group == 1 and rows * kv_heads <= FUSE_MAX_PROGRAMS


@functools.cache
def _counters(device: torch.device, size: int) -> torch.Tensor:
    """The fused path's arrival counters on ``device``, ``size`` of them, zeros: made once per device and size and
    kept for the process (a CUDA graph captured with them replays on them; the kernel leaves them at zero)."""
    return torch.zeros(size, device=device, dtype=torch.int32)


def counters(device: torch.device | str, programs: int) -> torch.Tensor:
    """At least ``programs`` zeroed counters on ``device`` for ``decode_attention(..., fused=True)``: a shared
    buffer (a power of two of them, 256 or more), so calls of any size on one device share a few. Calls that may
    run at the same time on two streams of one device need their own (``decode_attention``'s ``counts``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _counters(device, max(256, 1 << (programs - 1).bit_length()))


@dataclass(frozen=True)
class OutputShrink:
    """o_proj's LoRA shrink, done by ``decode_attention``'s merge: the output's head h is split h of o_proj's
    input, so the program that writes it also writes ``partials.p[0, h, row]`` (``lora_bgmv.LoraPartials``,
    ``[1, q_heads, rows, BLOCK_R]``, made by the caller; ``lora_expand_`` then adds o_proj's delta). ``lora_a``:
    o_proj's A table, ``[R, slots, q_heads * head_dim]``."""

    lora_a: torch.Tensor
    partials: LoraPartials

    def fits(self, q: torch.Tensor) -> bool:
        rows, q_heads, _, dim = q.shape
        p = self.partials.p
        return (self.lora_a.dim() == 3 and self.lora_a.shape[2] == q_heads * dim and self.lora_a.stride(2) == 1
                and self.lora_a.dtype in _DTYPES and self.lora_a.device == q.device and p.is_contiguous()
                and tuple(p.shape[:3]) == (1, q_heads, rows) and self.partials.rank <= self.lora_a.shape[0])

    def arguments(self) -> dict:
        """The kernels' keywords for it."""
        a, p = self.lora_a, self.partials
        return {"oa_ptr": a, "slot_ptr": p.slots, "op_ptr": p.p, "O_RANK": p.rank, "stride_oar": a.stride(0),
                "stride_oas": a.stride(1), "stride_ops": p.p.stride(1), "SHRINK": True, "BLOCK_R": p.block_r}


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float, chunk: int = CHUNK, fused: bool | None = None, counts: torch.Tensor | None = None,
                     shrink: OutputShrink | None = None, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=...)`` for a
    decode step (``fits`` must hold), computed in fp32 and returned in ``q``'s dtype as ``[rows, q_heads, 1,
    head_dim]``. ``chunk``: entries a split (a power of two; the engine keeps ``CHUNK``, benches try others).
    ``fused``: one launch, the last split of each row and key/value head merging (the same bits as ``False``, two
    launches: ``_attention_combine``), None for ``fuse_merge``'s choice; ``counts``: its zeroed int32 counters,
    ``rows * kv_heads`` or more (by default ``counters``' shared ones), zero again when the call's kernel ends.
    ``shrink``: o_proj's LoRA shrink written by the merge too (its ``fits`` must hold). ``fresh``: ``[rows]``
    integers, the entry of each row's keys and values that the kernel launched just before this call wrote (the
    decode step's append: ``rope_append``); with it the caller vouches that the mask and every other entry were
    written earlier still, so that under PDL they are read before the kernel waits for the one before it (the
    chunk's bytes in flight while the append runs) and only ``fresh``'s entry after the wait."""
    rows, q_heads, _, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    out = torch.empty((rows, q_heads, 1, dim), device=q.device, dtype=q.dtype)
    if rows == 0:
        return out
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, at least 16, got {chunk}")
    splits = -(-length // chunk)
    block_d = max(16, _triton().next_power_of_2(dim))  # a matrix product's dimensions are 16 or more
    m = torch.empty((rows, q_heads, splits), device=q.device, dtype=torch.float32)
    total = torch.empty_like(m)
    acc = torch.empty((rows, q_heads, splits, block_d), device=q.device, dtype=torch.float32)
    interpret = interpreting()
    group = q_heads // kv_heads
    same = q.dtype == keys.dtype == values.dtype and q.dtype in (torch.bfloat16, torch.float16)
    partials, combine = _kernels(interpret)
    fused = fuse_merge(rows, kv_heads, group) if fused is None else fused
    lora = {} if shrink is None else shrink.arguments()
    if fresh is not None and (fresh.shape != (rows,) or fresh.device != q.device or fresh.is_floating_point()):
        raise ValueError(f"fresh: [{rows}] integers on {q.device}")
    prefetch = {} if fresh is None else {"fresh_ptr": fresh, "PREFETCH": True}
    if fused:
        counts = counters(q.device, rows * kv_heads) if counts is None else counts
        if counts.dtype != torch.int32 or counts.numel() < rows * kv_heads or counts.device != q.device:
            raise ValueError(f"counts: int32 on {q.device}, {rows * kv_heads} or more")
        merge = {"count_ptr": counts, "o_ptr": out, "stride_ob": out.stride(0), "stride_oh": out.stride(1),
                 "FUSED": True, "BLOCK_S": COMBINE_BLOCK}
    partials[(rows * kv_heads, splits)](
        q, keys, values, mask, m, total, acc, length, splits, kv_heads, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0), mask.stride(3),
        HEAD_DIM=dim, BLOCK_D=block_d, GROUP=group, CHUNK=chunk, num_warps=4 if chunk <= 64 else 8,
        G_PAD=0 if group == 1 else max(16, _triton().next_power_of_2(group)), DOT_F32=interpret or not same,
        **(merge | lora if fused else {}), **prefetch, **pdl_launch(q.device))
    if fused:
        return out
    combine[(rows * q_heads,)](
        m, total, acc, out, splits, q_heads, out.stride(0), out.stride(1),
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK, num_warps=4, **lora, **pdl_launch(q.device))
    return out
