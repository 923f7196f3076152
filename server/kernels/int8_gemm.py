"""The int8 weight-only matmul for many rows (prefill, ``M > int8_matmul.MAX_KERNEL_ROWS``): a tiled GEMM kernel,
BLOCK_M 64/128 with a grouped tile order for L2 reuse, tuned per row bucket 128, 256, ..., 4096 (larger M shares
the 4096 bucket). It reads the int8 weight in place, widened to x's dtype in registers, instead of dequantizing
it to a bf16 copy first (a write and a re-read of the whole weight). ``int8_matmul.int8_weight_matmul`` picks it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .int8_configs import _INTERPRET_GEMM, _gemm_configs, even_k
from .support import quick_bench

MAX_GEMM_BUCKET = 4096  # the largest row bucket of the GEMM kernel's autotune key (more rows share it)


def gemm_bucket(m: int) -> int:
    """The GEMM kernel's autotune bucket of ``m`` rows: the next power of two, at most ``MAX_GEMM_BUCKET``."""
    return min(MAX_GEMM_BUCKET, triton.next_power_of_2(max(m, 1)))


def _int8_gemm(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,  # noqa: N803 (Triton's naming)
               stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of y for large M (prefill): a 1-D grid walked in groups of ``GROUP_M``
    row blocks (the programs running together share weight tiles and activation tiles in L2). The int8
    weight tile is widened to x's dtype in registers; no eviction hint: other row blocks re-read it."""
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    xs = x_ptr + (rm % M)[:, None] * stride_xm + rk[None, :] * stride_xk
    ws = w_ptr + (rn % N)[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            x = tl.load(xs)
            w = tl.load(ws)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(xs, mask=rk[None, :] < k_left, other=0.0)
            w = tl.load(ws, mask=rk[:, None] < k_left, other=0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        xs += BLOCK_K * stride_xk
        ws += BLOCK_K * stride_wk
    acc = acc * (tl.load(s_ptr + rn % N) * (1.0 / 127.0))[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn % N).to(tl.float32)[None, :]
    ys = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.cache
def _gemm_kernels(interpret: bool):
    """(the large-M kernel, its autotuner), built lazily and cached on disk as ``_small_kernels``."""
    if interpret:
        configs, tuning = [triton.Config(_INTERPRET_GEMM)], {}
    else:
        configs, tuning = _gemm_configs(), {"do_bench": quick_bench, "cache_results": True}
    gemm = even_k(triton.jit(_int8_gemm, do_not_specialize=["M", "M_BUCKET"]))
    return gemm, triton.autotune(configs, key=["M_BUCKET", "N", "K"], **tuning)(gemm)


def _large_m(x2: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
             interpret: bool, config: dict | None = None) -> torch.Tensor:
    """The tiled GEMM kernel on ``x2 [M, K]`` (any M; used above MAX_KERNEL_ROWS). ``config`` (tests): launch
    kwargs (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, optionally ``num_warps``, ``num_stages``) to run
    instead of the tuned choice."""
    (m, k), n = x2.shape, cb.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    cb = cb if cb.stride(1) == 1 else cb.contiguous()
    gemm, tuner = _gemm_kernels(interpret)
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
    args = (x2, cb, scb, scb if bias is None else bias, y, m, n, k, gemm_bucket(m),
            x2.stride(0), x2.stride(1), cb.stride(0), cb.stride(1), y.stride(0), y.stride(1))
    meta = {"HAS_BIAS": bias is not None, "DOT_F32": interpret or x2.dtype == torch.float32}
    if config is None:
        tuner[grid](*args, **meta)
    else:
        gemm[grid(config)](*args, **meta, **config)
    return y
