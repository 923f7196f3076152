"""One row times a bf16 or fp16 weight: ``y = x @ W.T + bias`` for batch-1 decode, in Triton (issue 18).

At one row a linear layer is a matrix-vector product: each weight byte is read once for 1 multiply-add, so the
time is the weight's bytes over the bandwidth reached. cuBLAS reads a 7B bf16 model's projections at ~3.5 TB/s
of the H200's 4.8 (bench/NOTES.md, "Ninth session": 3.72 of a 4.29 ms step). This kernel streams whole weight
rows the way the int8 GEMV does (``int8_matmul.py``): program ``n`` reduces ``BLOCK_N`` rows of ``W``
(``[N, K]`` row major), ``BLOCK_K`` columns a step (16-byte loads along a row), the next tile loaded before the
current one is used, the products summed elementwise into a tile of fp32 sums that is reduced across lanes
once, after the loop. A bf16 or fp16 product is exact in fp32 (8 or 11 significant bits a factor), so the
sums are fp32 sums of exact products, as cuBLAS's are; the order differs, and the output is rounded once.

With programmatic dependent launch (``support.pdl_enabled``) the first weight tile is requested before the
kernel waits for the one before it (``gdc_wait``): the weight stream starts while a norm or the attention's
merge still runs.

Where it runs: the engine warms it up for each weight shape before any CUDA graph capture (``warm_up``), which
tunes its tiles and then times it against ``F.linear`` on the same weight; ``linear`` takes the kernel only for
the shapes where it won (``chosen``), and ``F.linear`` for everything else (more rows, fp32, a shape never
warmed up, the CPU). Nothing is tuned inside a call, so a captured step never benchmarks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .support import interpreting, pdl_launch, quick_bench, triton_available, triton_into, tuner_choices

_DTYPES = (torch.bfloat16, torch.float16)
# (BLOCK_N, BLOCK_K, num_warps): 2-16 KB of weight a tile, 16 bytes a thread a load, 4-16 loads a thread in
# flight with the next tile's; 8 rows a program give a 4096-row weight 512 programs for 132 SMs.
_CONFIGS = ((4, 512, 1), (4, 1024, 2), (8, 512, 2), (8, 1024, 4), (16, 512, 4), (16, 1024, 8), (4, 2048, 4),
            (8, 2048, 8))
_INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64}  # few programs: the interpreter runs each in numpy

# Bound on first use by ``_triton()``: the kernel's body refers to ``tl`` and ``libdevice`` as module globals.
triton = None
tl = None
libdevice = None


def dense_gemv_available(device: torch.device | str) -> bool:
    """True when the kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


# ---------------------------------------------------------------------------------------------- kernel
# Only Triton builtins are called, as in int8_matmul.py. Rows past N are wrapped (``% N``), not masked: their
# sums are computed and never stored.


def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,  # noqa: N803 (Triton's naming)
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
          ROUND_BF16: tl.constexpr = False, USE_PDL: tl.constexpr = False, GLU: tl.constexpr = False,
          INTERPRETED: tl.constexpr = False, PAIR=1, ROPE: tl.constexpr = False, cos_ptr=None, sin_ptr=None,
          kc_ptr=None, vc_ptr=None, pos_ptr=None, Q_HEADS=0, KV_HEADS=0, stride_kch=0, stride_kct=0, stride_vch=0,
          stride_vct=0):
    """Rows ``[program_id(0) * BLOCK_N, ...)`` of y: ``y[n] = sum_k x[k] * W[n, k] (+ bias[n])``, x and y one
    contiguous row each. ``K_TILES = cdiv(K, BLOCK_K)`` is a constexpr: Triton 3.6's interpreter (the GPU
    image's) cannot take a tensor loop bound.

    ``GLU`` (an MLP's fused gate/up weight, ``[2 N, K]``: gate's N rows, then up's): the program's tile holds
    ``BLOCK_N / 2`` gate rows and the up rows of the same outputs, interleaved (gate ``j`` at tile row ``2 i``, up
    ``j`` at ``2 i + 1``), and it stores ``silu(gate) * up`` for those ``j``, each factor rounded to y's dtype
    first and the SiLU and product with ``silu_mul.py``'s roundings: the values of ``silu_mul`` on this kernel's
    gate/up output, bit for bit, with the same tiles (each row's sum does not depend on the tile's other rows).

    ``ROPE`` (a fused q/k/v weight, ``[(Q_HEADS + 2 KV_HEADS) * 2 PAIR, K]``, heads of ``2 PAIR`` rows): the tile
    pairs row ``e`` of a head with its row ``e + PAIR`` (rotate_half's partners), and the program does
    ``rope_append.py``'s work for its pairs with that kernel's roundings: a query head's rotated into ``y``
    (``[Q_HEADS, 2 PAIR]``), a key head's rotated and a value head's as it is written at entry ``pos[0]`` of
    the layer's cache (``kc``/``vc``: row 0's heads and entries by their strides). ``N``: the number of pairs."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if GLU or ROPE:  # tile row 2 i: the program's i-th pair's first row (a gate row, a head's row e), 2 i + 1:
        # its partner PAIR rows on (the up row of that output, the head's row e + PAIR); GLU's PAIR is N
        t = (tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2) % N
        rows = (t // PAIR) * (2 * PAIR) + t % PAIR + (tl.arange(0, BLOCK_N) % 2) * PAIR
    else:
        rows = rn % N
    ws = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    xs = x_ptr + rk
    w = tl.load(ws, mask=rk[None, :] < K, other=0.0, eviction_policy="evict_first")
    if USE_PDL:  # the weight is no kernel's output: its first tile is in flight before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(xs, mask=rk < K, other=0.0)
    sums = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for k in range(0, K_TILES):
        ws += BLOCK_K
        xs += BLOCK_K
        k_left = K - (k + 1) * BLOCK_K  # <= 0 past the end: the last prefetch loads nothing
        w_next = tl.load(ws, mask=rk[None, :] < k_left, other=0.0, eviction_policy="evict_first")
        x_next = tl.load(xs, mask=rk < k_left, other=0.0)
        sums += w.to(tl.float32) * x.to(tl.float32)[None, :]  # exact products, summed in fp32
        w = w_next
        x = x_next
    acc = tl.reduce(sums, 1, tl.standard._sum_combine)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)
    if ROUND_BF16:  # the interpreter's fp32 -> bf16 cast truncates (Triton 3.9): round to nearest even by hand
        bits = acc.to(tl.uint32, bitcast=True)
        acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    if GLU:  # silu_mul.py's kernel on the rounded gate and up (see there for the roundings)
        g, u = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N // 2, 2)))
        if INTERPRETED:
            s = g / (1.0 + tl.exp(-g))
        else:
            s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        if ROUND_BF16:
            sb = s.to(tl.uint32, bitcast=True)
            s = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            out = s * u
            ob = out.to(tl.uint32, bitcast=True)
            out = ((ob + 0x7FFF + ((ob >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            out = s.to(y_ptr.dtype.element_ty).to(tl.float32) * u
        cols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=cols < N)
    elif ROPE:  # rope_append.py's kernel on q, k and v rounded to y's dtype (a copy: see there for the roundings)
        x2 = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        lo, hi = tl.split(tl.reshape(x2, (BLOCK_N // 2, 2)))
        t = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # the pairs: head t // PAIR, row t % PAIR
        head, e, ok = t // PAIR, t % PAIR, t < N
        cos_lo = tl.load(cos_ptr + e, mask=ok, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + PAIR + e, mask=ok, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + e, mask=ok, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + PAIR + e, mask=ok, other=0.0).to(tl.float32)
        c = tl.join(lo * cos_lo, hi * cos_hi)  # [pairs, 2]: x * cos, then rotate_half(x) * sin = (-hi, lo) * sin
        s = tl.join(-hi * sin_lo, lo * sin_hi)
        if ROUND_BF16:
            cb = c.to(tl.uint32, bitcast=True)
            c = ((cb + 0x7FFF + ((cb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            sb = s.to(tl.uint32, bitcast=True)
            s = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            r = c + s
            rb = r.to(tl.uint32, bitcast=True)
            r = ((rb + 0x7FFF + ((rb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            dtype = y_ptr.dtype.element_ty
            r = (c.to(dtype).to(tl.float32) + s.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        at = e[:, None] + tl.arange(0, 2)[None, :] * PAIR  # [pairs, 2]: entries e and e + PAIR of a head
        where = tl.load(pos_ptr).to(tl.int64)
        is_q = ok & (head < Q_HEADS)
        is_k = ok & (head >= Q_HEADS) & (head < Q_HEADS + KV_HEADS)
        is_v = ok & (head >= Q_HEADS + KV_HEADS)
        kv = tl.where(is_v, head - Q_HEADS - KV_HEADS, head - Q_HEADS).to(tl.int64)
        tl.store(y_ptr + head[:, None] * (2 * PAIR) + at, r.to(y_ptr.dtype.element_ty), mask=is_q[:, None])
        tl.store(kc_ptr + kv[:, None] * stride_kch + where * stride_kct + at, r.to(kc_ptr.dtype.element_ty),
                 mask=is_k[:, None])
        tl.store(vc_ptr + kv[:, None] * stride_vch + where * stride_vct + at,
                 tl.join(lo, hi).to(vc_ptr.dtype.element_ty), mask=is_v[:, None])
    else:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def _triton():
    """Import Triton (once) into this module's globals, with ``libdevice``, where the kernel's body finds them."""
    module = triton_into(globals())
    if globals()["libdevice"] is None:
        from triton.language.extra import libdevice as lib

        globals()["libdevice"] = lib
    return module


@functools.cache
def _kernels(interpret: bool):
    """(the jitted kernel, its autotuner or None in the interpreter), built at the first call of each mode
    (``triton.jit`` reads TRITON_INTERPRET). The tuner's choices are cached on disk, as int8_matmul's are."""
    triton = _triton()
    # K_TILES follows each config's BLOCK_K (a heuristic runs after the tuner picks the config)
    kernel = triton.heuristics({"K_TILES": lambda a: triton.cdiv(a["K"], a["BLOCK_K"])})(triton.jit(_gemv))
    if interpret:
        return kernel, None
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1) for bn, bk, w in _CONFIGS]
    return kernel, triton.autotune(configs, key=["N", "K"], do_bench=quick_bench, cache_results=True)(kernel)


def tuned_configs() -> dict[str, str]:
    """The GEMV's autotune choices so far, ``"N, K, dtypes..."`` -> config (``tuner_choices``)."""
    return tuner_choices(_kernels(interpreting())[1])


# ---------------------------------------------------------------------------------------------- wrappers

# (N, K, dtype, bias dtype, device) -> the tuned launch config, for the shapes where the kernel beat F.linear
_CHOSEN: dict[tuple, dict] = {}


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return (*weight.shape, weight.dtype, None if bias is None else bias.dtype, weight.device)


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``gemv`` takes these: one row of x (any leading dims of size 1), x and a 2-D weight of one of
    bf16/fp16 on one device, unit strides along K (x contiguous), rows of the weight 16-byte aligned, a bias
    of N entries or none."""
    return (x.dim() >= 1 and x.numel() == x.shape[-1] and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.dtype in _DTYPES and weight.dtype == x.dtype and x.device == weight.device
            and x.is_contiguous() and weight.stride(1) == 1 and (weight.stride(0) * weight.element_size()) % 16 == 0
            and weight.data_ptr() % 16 == 0 and (bias is None or bias.shape == (weight.shape[0],)))


def chosen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` runs the kernel for these: ``fits``, and ``warm_up`` found it faster than ``F.linear``
    for this weight's shape (the interpreter: always)."""
    return fits(x, weight, bias) and (interpreting() or _key(x, weight, bias) in _CHOSEN)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for one row (``fits`` must hold), ``[..., N]`` in x's dtype, through the kernel:
    ``config`` (``BLOCK_N``, ``BLOCK_K``, optionally ``num_warps``), else the tuned one for the shape (tuning it
    now on the first call of a shape: never inside a graph capture; ``warm_up`` first)."""
    return _launch(x, weight, bias, config)


def glu_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``silu_glu`` takes these: what ``gemv`` takes, with an even number of weight rows (gate's, then
    up's)."""
    return fits(x, weight, bias) and weight.shape[0] % 2 == 0


def glu_chosen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the decoder runs ``silu_glu`` for these: ``glu_fits``, and ``chosen`` for the weight's shape (the
    GEMV's warm-up decides; ``silu_glu`` runs the same tiles)."""
    return glu_fits(x, weight, bias) and chosen(x, weight, bias)


def silu_glu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``silu(g) * u`` for ``g, u = (x @ weight.T + bias).chunk(2, -1)``, one row (``glu_fits`` must hold), in one
    launch: ``[..., N / 2]`` in x's dtype, the values of ``silu_mul.silu_mul(g, u)`` on ``gemv``'s output with the
    same tiles (``config``, else the shape's tuned one, as ``gemv``), bit for bit. Saves the SiLU's launch and the
    gate/up row's write and read at a batch-1 decode step."""
    return _launch(x, weight, bias, config, glu=True)


def rope_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head_dim: int, q_heads: int) -> bool:
    """Whether ``rope_append`` takes these: what ``chosen`` takes (``rope_append`` runs the weight's tiles), a
    fused q/k/v weight of whole heads of an even ``head_dim`` (``q_heads``, then ``keys``' heads twice), one
    row's ``cos`` and ``sin`` of one head each and the layer's caches with unit strides along the head."""
    return chosen(x, weight, bias) and support_rope(x, weight.shape[0], cos, sin, keys, values, head_dim, q_heads)


def support_rope(x: torch.Tensor, rows: int, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, head_dim: int, q_heads: int) -> bool:
    """The shapes a GEMV's rotary epilogue takes (this kernel's and ``int8_matmul``'s): one bf16/fp16 row, a
    weight of ``rows`` = (``q_heads`` + 2 key/value heads) * ``head_dim`` rows, ``head_dim`` even, ``cos``/``sin``
    ``[1, 1, head_dim]`` contiguous, ``keys``/``values`` ``[>= 1, kv heads, entries, head_dim]`` alike."""
    kv_heads = keys.shape[1] if keys.dim() == 4 else 0
    return (x.dtype in _DTYPES and x.numel() == x.shape[-1] and head_dim % 2 == 0 and kv_heads > 0
            and rows == (q_heads + 2 * kv_heads) * head_dim and cos.shape == (1, 1, head_dim) == sin.shape
            and cos.is_contiguous() and sin.is_contiguous() and keys.shape[-1] == head_dim
            and values.shape == keys.shape and keys.stride(-1) == 1 and values.stride(-1) == 1)


def rope_arguments(cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   write_pos: torch.Tensor, head_dim: int, q_heads: int) -> dict:
    """The rotary epilogue's kernel keywords (both GEMVs take the same ones)."""
    return dict(ROPE=True, PAIR=head_dim // 2, cos_ptr=cos, sin_ptr=sin, kc_ptr=keys, vc_ptr=values,
                pos_ptr=write_pos, Q_HEADS=q_heads, KV_HEADS=keys.shape[1], stride_kch=keys.stride(1),
                stride_kct=keys.stride(2), stride_vch=values.stride(1), stride_vct=values.stride(2))


def rope_append(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor, head_dim: int,
                q_heads: int, config: dict | None = None) -> torch.Tensor:
    """The q/k/v projection of one row, rotated and appended, in one launch: ``q, k, v = gemv(x, weight, bias)``
    split into heads, then ``rope_append.rope_append(q, k, v, cos, sin, keys, values, write_pos)``, with that
    kernel's values bit for bit for the same tiles (``config``, else the shape's tuned one, as ``gemv``).
    ``rope_fits`` must hold (the interpreter: ``support_rope``). Returns the rotated query, ``[1, q_heads, 1,
    head_dim]``; writes row 0's key and value at entry ``write_pos[0]`` of ``keys``/``values``. Saves the
    rotation's launch and the q/k/v row's write and read at a batch-1 decode step."""
    y = _launch(x, weight, bias, config, out=q_heads * head_dim,
                meta=rope_arguments(cos, sin, keys, values, write_pos, head_dim, q_heads))
    return y.view(1, q_heads, 1, head_dim)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | None,
            glu: bool = False, out: int | None = None, meta: dict | None = None) -> torch.Tensor:
    """The kernel on these: ``glu``, the SiLU product's epilogue; ``meta`` (the rotary one's keywords), that
    epilogue, storing ``out`` values to y (and the rest to the caches)."""
    n, k = weight.shape
    pairs = n // 2 if glu or meta else n  # the kernel's N: outputs, or the tiles' row pairs
    y = torch.empty((*x.shape[:-1], out or pairs), device=x.device, dtype=x.dtype)
    interpret = interpreting()
    kernel, tuner = _kernels(interpret)
    meta = {"HAS_BIAS": bias is not None, "ROUND_BF16": interpret and x.dtype == torch.bfloat16,
            **pdl_launch(x.device), **(meta or {})}
    if glu:  # the constexprs' defaults otherwise: the plain kernel's compiled variant is unchanged
        meta.update(GLU=True, PAIR=pairs)
    if glu or meta.get("ROPE"):
        meta.update(INTERPRETED=interpret)
    args = (x, weight, weight if bias is None else bias, y, pairs, k, weight.stride(0))
    config = config or _CHOSEN.get(_key(x, weight, bias)) or (_INTERPRET_CONFIG if tuner is None else None)
    if config is None and pairs != n:  # the plain kernel's tiles for the weight, tuned now (``gemv``'s first call)
        _launch(x, weight, bias, None)
        config = tuner.best_config.all_kwargs()
    cdiv = _triton().cdiv
    if config is None:
        tuner[lambda c: (cdiv(n, c["BLOCK_N"]),)](*args, **meta)
    else:
        kernel[(cdiv(n, config["BLOCK_N"]),)](*args, **meta, **config)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where ``chosen``."""
    return gemv(x, weight, bias) if chosen(x, weight, bias) else F.linear(x, weight, bias)


@dataclass(frozen=True)
class Epilogue:
    """What follows a weight's one-row matmul in the decoder and runs in the GEMV's epilogue where the GEMV is
    chosen: ``"glu"`` (an MLP's fused gate/up: the SiLU product, ``silu_glu``) or ``"rope"`` (an attention's
    fused q/k/v of ``q_heads`` query heads of ``head_dim``: the rotation and append, ``rope_append``)."""

    kind: str
    head_dim: int = 0
    q_heads: int = 0

    def runs(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             config: dict) -> tuple[Callable[[], object], Callable[[], object]]:
        """(the GEMV with this epilogue, ``F.linear`` then the separate kernel), on ``x`` and scratch tensors."""
        if self.kind == "glu":
            from .silu_mul import silu_mul

            return (lambda: silu_glu(x, weight, bias, config=config),
                    lambda: silu_mul(*F.linear(x, weight, bias).chunk(2, dim=-1)))
        from .rope_append import rope_append as rotate

        dim, q_heads = self.head_dim, self.q_heads
        kv_heads = (weight.shape[0] // dim - q_heads) // 2
        cos = torch.ones(1, 1, dim, device=x.device, dtype=x.dtype)
        sin = torch.zeros_like(cos)
        keys = torch.zeros(1, kv_heads, 1, dim, device=x.device, dtype=x.dtype)
        values, write_pos = torch.zeros_like(keys), torch.zeros(1, device=x.device, dtype=torch.long)

        def theirs() -> object:
            q, k, v = F.linear(x, weight, bias).view(1, 1, -1, dim).split([q_heads, kv_heads, kv_heads], dim=2)
            return rotate(q, k, v, cos, sin, keys, values, write_pos)

        return (lambda: rope_append(x, weight, bias, cos, sin, keys, values, write_pos, dim, q_heads,
                                    config=config), theirs)


@torch.no_grad()
def warm_up(weights: list[tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None,
                                                                            Epilogue | None]],
            ) -> dict[tuple[int, int], tuple[float, float]]:
    """Tune the kernel for each distinct ``(weight, bias)`` shape (bf16/fp16 weights on a CUDA device where the
    kernel runs; others are skipped), time its choice against ``F.linear`` on a zero row (``support.quick_bench``,
    L2 cleared before each call: decode reads every weight from HBM), and keep the kernel for the shapes where
    it was faster. A weight given with its ``Epilogue`` is judged with it: the GEMV with the epilogue against
    ``F.linear`` then the separate kernel (the choice is per shape: another weight of that shape follows it).
    Call before any CUDA graph capture. Returns ``{(N, K): (kernel us, F.linear us)}``."""
    times: dict[tuple[int, int], tuple[float, float]] = {}
    for weight, bias, *rest in weights:
        epilogue = rest[0] if rest else None
        x = torch.zeros(1, weight.shape[1], device=weight.device, dtype=weight.dtype)
        key = _key(x, weight, bias)
        if (tuple(weight.shape) in times or key in _CHOSEN or not fits(x, weight, bias)
                or not dense_gemv_available(weight.device)):
            continue
        gemv(x, weight, bias)  # tunes
        config = _kernels(False)[1].best_config.all_kwargs()
        if epilogue is None:
            runs = (lambda: gemv(x, weight, bias, config=config),  # noqa: B023
                    lambda: F.linear(x, weight, bias))  # noqa: B023
        else:
            runs = epilogue.runs(x, weight, bias, config)
        ours, theirs = (quick_bench(run, None) for run in runs)
        times[tuple(weight.shape)] = (ours * 1e3, theirs * 1e3)
        if ours < theirs:
            _CHOSEN[key] = config
    return times
