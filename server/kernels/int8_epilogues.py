"""The int8 one-row GEMV's epilogues (``int8_matmul._int8_mm``'s ``GLU`` and ``ROPE``): at a batch-1 decode step
the fused gate/up matmul stores ``silu(gate) * up`` (``silu_glu``) and the fused q/k/v matmul rotates q and k and
appends k and v to the layer's cache (``rope_append``), each in the matmul's own launch, with the values of the
two steps (the plain GEMV with the same tiles, then ``silu_mul`` or ``rope_append.rope_append``) bit for bit.

Both run the GEMV tiles of one split (BLOCK_M 1, SPLIT_K 1), where each program's tile pairs rows: gate row j
with up row N + j, or a head's row e with its row e + head_dim / 2 (rotate_half's partners). On the GPU they take
the one-row key's tuned choice when it is such a tile (warm-up tunes it), else the caller runs the two steps.
"""

from __future__ import annotations

import torch
import triton

from .int8_matmul import _CHOSEN, _DTYPES, _small_kernels, _small_key
from .support import interpreting, pdl_launch

_INTERPRET_TILES = {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 32, "SPLIT_K": 1}  # the interpreter's epilogue tiles


def _one_split_tiles(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                interpret: bool) -> dict | None:
    """The GEMV tiles the epilogues run for these: the one-row key's tuned choice where it is a GEMV tile of one
    split (the interpreter: ``_INTERPRET_TILES``), else None."""
    if interpret:
        return _INTERPRET_TILES
    config = _CHOSEN.get(_small_key(False, 1, x, cb, scb, bias))
    return config if config and config["BLOCK_M"] == 1 and config["SPLIT_K"] == 1 else None


def glu_fits(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``silu_glu`` takes these: one row of x on a CUDA device (or the interpreter), K a multiple of 4,
    an even number of weight rows (gate's, then up's), a weight the GEMV reads in place (row major, 4-byte
    aligned rows), and the one-row matmul of this weight tuned to GEMV tiles of one split (warm-up tunes it;
    ``silu_glu`` runs those tiles)."""
    interpret = interpreting()
    return (x.dtype in _DTYPES and x.numel() == x.shape[-1] and (x.is_cuda or interpret) and cb.dim() == 2
            and cb.shape[1] == x.shape[-1] and cb.shape[0] % 2 == 0 and cb.shape[1] % 4 == 0 and cb.stride(1) == 1
            and cb.stride(0) % 4 == 0 and cb.data_ptr() % 4 == 0 and scb.shape == (cb.shape[0],)
            and (bias is None or bias.shape == (cb.shape[0],))
            and _one_split_tiles(x, cb, scb, bias, interpret) is not None)


def silu_glu(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``silu(g) * u`` for ``g, u = int8_weight_matmul(x, cb, scb, bias).chunk(2, -1)``, one row (``glu_fits`` must
    hold, or ``config`` be GEMV tiles of one split), in one launch: ``[..., N / 2]`` in x's dtype, the values of
    ``silu_mul.silu_mul(g, u)`` on the one-row kernel's output with the same tiles, bit for bit. Saves the SiLU's
    launch and the gate/up row's write and read at a batch-1 decode step."""
    n = cb.shape[0] // 2
    return _paired(x, cb, scb, bias, config, n, {"GLU": True, "PAIR": n}).reshape(*x.shape[:-1], n)


def rope_fits(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head_dim: int, q_heads: int) -> bool:
    """Whether ``rope_append`` takes these: what ``glu_fits`` asks of x and the weight (one row, whole words, the
    one-row key tuned to GEMV tiles of one split); x bf16 or fp16 (fp32 is left to the two steps: the GEMV's
    compiled products may fuse where ``rope_append.py`` rounds each); a weight of (``q_heads`` + 2 key/value
    heads) * ``head_dim`` rows, ``head_dim`` even; ``cos``/``sin`` ``[1, 1, head_dim]`` contiguous;
    ``keys``/``values`` ``[>= 1, kv heads, entries, head_dim]`` alike."""
    kv_heads = keys.shape[1] if keys.dim() == 4 else 0
    return (x.dtype in (torch.bfloat16, torch.float16) and head_dim % 2 == 0 and kv_heads > 0
            and cb.shape[0] == (q_heads + 2 * kv_heads) * head_dim
            and cos.shape == (1, 1, head_dim) == sin.shape and cos.is_contiguous() and sin.is_contiguous()
            and keys.shape[-1] == head_dim and values.shape == keys.shape and keys.stride(-1) == 1
            and values.stride(-1) == 1 and glu_fits(x, cb, scb, bias))


def rope_append(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor, head_dim: int,
                q_heads: int, config: dict | None = None) -> torch.Tensor:
    """The q/k/v projection of one row, rotated and appended, in one launch (``rope_fits`` must hold, or
    ``config`` be GEMV tiles of one split): ``q, k, v = int8_weight_matmul(x, cb, scb, bias)`` split into heads,
    then ``rope_append.rope_append(q, k, v, cos, sin, keys, values, write_pos)``, with the two steps' values bit
    for bit for the same tiles. Returns the rotated query ``[1, q_heads, 1, head_dim]``; writes row 0's key and
    value at entry ``write_pos[0]`` of ``keys``/``values``. Saves the rotation's launch and the q/k/v row's write
    and read at a batch-1 decode step.

    The float GEMV (``dense_gemv.py``) has no such epilogue: a copy of this one gave wrong q and k values for
    some of its tiles compiled on the H200 (e7e7876; bench/NOTES.md), while its values kept right."""
    meta = dict(ROPE=True, PAIR=head_dim // 2, cos_ptr=cos, sin_ptr=sin, kc_ptr=keys, vc_ptr=values,
                pos_ptr=write_pos, Q_HEADS=q_heads, KV_HEADS=keys.shape[1], stride_kch=keys.stride(1),
                stride_kct=keys.stride(2), stride_vch=values.stride(1), stride_vct=values.stride(2))
    return _paired(x, cb, scb, bias, config, q_heads * head_dim, meta).view(1, q_heads, 1, head_dim)


def _paired(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, config: dict | None,
            out: int, meta: dict) -> torch.Tensor:
    """One launch of the GEMV tiles with an epilogue (``meta``: its keywords) over the weight's row pairs,
    ``out`` values stored to the returned ``[1, out]``."""
    interpret = interpreting()
    x2 = x.reshape(1, x.shape[-1])
    config = config or _one_split_tiles(x2, cb, scb, bias, interpret)
    if config is None or config["BLOCK_M"] != 1 or config["SPLIT_K"] != 1:
        raise ValueError(f"the epilogues run GEMV tiles of one split (BLOCK_M 1, SPLIT_K 1), got {config}")
    pairs, k = cb.shape[0] // 2, cb.shape[1]
    y = torch.empty((1, out), device=x.device, dtype=x.dtype)
    meta = {"HAS_BIAS": bias is not None, "DOT_F32": False, "INTERPRETED": interpret,
            "ROUND_BF16": interpret and x.dtype == torch.bfloat16, **pdl_launch(x.device), **meta}
    _small_kernels(interpret)[0][(1, triton.cdiv(2 * pairs, config["BLOCK_N"]), 1)](
        x2, cb, scb, scb if bias is None else bias, y, y, 1, pairs, k, 1, x2.stride(0), x2.stride(1), cb.stride(0),
        cb.stride(1), y.stride(0), y.stride(1), **meta, **config)
    return y
