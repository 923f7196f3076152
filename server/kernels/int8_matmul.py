"""A weight-only int8 matmul for decode: ``y = x @ (CB * SCB[:, None] / 127).T + bias``, in Triton.

Why: bitsandbytes' LLM.int8 matmul (threshold 0) quantizes the activations to int8 and runs an int8 GEMM
with a dequantizing epilogue; at decode's few rows that path is 3 to 5 times slower than a bf16 matmul on an
H200. Decode is memory bound: each step reads every weight once and does only 2 flops with it per row.
This kernel reads the int8 weight once (1 byte per weight, half of bf16), widens each tile to the
activation dtype in registers, accumulates in fp32 on the tensor cores and applies the per-row scale once
per output element after the K loop. Activations stay in their dtype (no activation quantization), so the
result is closer to the dequantized weight's exact product than bitsandbytes' own.

Layout (as bitsandbytes keeps a ``Linear8bitLt`` on the device): ``CB`` int8 ``[N, K]`` row major (one output
feature a row), ``SCB`` float32 ``[N]`` (the row's absmax), so ``W[n, k] = CB[n, k] * SCB[n] / 127``.

Rows: the kernel serves ``M <= MAX_KERNEL_ROWS`` (64) rows of ``x`` (decode: one row a sequence; 64 is
the largest row bucket its tiles are tuned for). Above it (prefill), the weight is dequantized to
``x.dtype`` and cuBLAS runs the product: a prompt of hundreds of rows is compute bound, cuBLAS' large tiles
beat these small-M tiles there, and the extra pass over the weight (read int8, write and re-read bf16: ~5
bytes a weight instead of bf16's 2) is small beside its flops. Just above 64 rows that pass is not small;
where the two paths cross is for bench/int8_kernel_bench.py (``--rows``) on the GPU to show.

CUDA graphs: the launch has no host sync and no value-dependent allocation. The first call for each
(row bucket, N, K, dtypes) autotunes (benchmarks a few configs, with syncs) and compiles: that must happen
before capture, e.g. through ``adapterd.server.kernels.warm_up`` or eager warm-up forwards. Row counts are
bucketed to powers of two (1, 2, 4, ..., 64) for the autotune key, and ``M`` is not specialized, so one
warm-up call per bucket covers every row count in it.

Interpreter: with ``TRITON_INTERPRET=1`` (read at each call, not at import) the same kernel runs on CPU
tensors through Triton's interpreter, with one small tile config (the tests use it).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_KERNEL_ROWS = 64  # rows of x served by the kernel; more rows go through dequantize + cuBLAS (see above)
_INV_127 = 1.0 / 127.0  # bitsandbytes' absmax scale: W = CB * SCB / 127
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's own TRITON_INTERPRET parser accepts


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read now, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def row_bucket(m: int) -> int:
    """The autotune bucket of ``m`` rows: the next power of two, at most ``MAX_KERNEL_ROWS``."""
    return min(MAX_KERNEL_ROWS, triton.next_power_of_2(max(m, 1)))


# ----------------------------------------------------------------------------------------------- kernel


def _int8_mm(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,  # noqa: N803 (Triton's naming)
             stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
             HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of y. Axis 0 walks row blocks (fastest), so the row blocks that share
    a weight tile run together and later reads of that tile mostly come from L2. ``M_BUCKET`` is only the
    autotune key. Out-of-range rows and columns are wrapped (``% M``, ``% N``) instead of masked, so the
    loads of an even K need no mask; the store is masked. Only Triton builtins are called (``tl.full``, not
    the library's ``@triton.jit`` ``tl.zeros``/``tl.cdiv``): library functions are made compiled-only when
    Triton is imported without TRITON_INTERPRET, and this lets the interpreter be switched on later."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    xs = x_ptr + (rm % M)[:, None] * stride_xm + rk[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    ws = w_ptr + (rn % N)[None, :] * stride_wn + rk[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            x = tl.load(xs)
            w = tl.load(ws, eviction_policy="evict_first")  # each weight byte is read once: keep x in cache
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(xs, mask=rk[None, :] < k_left, other=0.0)
            w = tl.load(ws, mask=rk[:, None] < k_left, other=0, eviction_policy="evict_first")
        if DOT_F32:  # fp32 inputs; and the interpreter, whose dot multiplies bf16 as raw uint16 bits
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:  # bf16/fp16 tensor cores; int8 -> x.dtype is exact (|CB| <= 127), products exact in fp32
            acc = tl.dot(x, w.to(x.dtype), acc)
        xs += BLOCK_K * stride_xk
        ws += BLOCK_K * stride_wk
    scale = tl.load(s_ptr + rn % N) * (1.0 / 127.0)  # one multiply per output, after the K loop
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn % N).to(tl.float32)[None, :]
    ys = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _gpu_configs() -> list[triton.Config]:
    """Tiles for M <= 64 rows. BLOCK_N 16..128 trades parallelism (N / BLOCK_N programs: an H200 has 132
    SMs, and a 4096-row weight gives only 32 programs at 128) against per-program overhead; BLOCK_K 128..256
    int8 bytes a row and 3-4 stages keep 8-32 KB of weight in flight per program. BLOCK_M > 16 only for
    the 32 and 64 row buckets (pruned below), where fewer row blocks mean fewer re-reads of each tile."""
    tiles = [(16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3),
             (128, 128, 4, 3), (128, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bm in (16, 32, 64) for bn, bk, warps, stages in tiles]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose row block is larger than the bucket (they would compute only padding)."""
    bucket = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= bucket]


def _quick_bench(fn, quantiles):
    """Autotuning's timer: 5 ms warm-up and 25 ms of repetitions a config instead of Triton's 25 + 100 ms (a
    call takes microseconds; do_bench clears L2 before each repetition, so every one reads HBM)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _kernel(interpret: bool):
    """The autotuned kernel, built at the first call of each mode (``triton.jit`` reads TRITON_INTERPRET when
    it wraps the function, so building lazily lets the interpreter be switched on at run time). On the GPU
    the choices are cached on disk (``cache_results``, keyed by Triton version, GPU target, kernel source,
    shape key and configs; next to the compiled kernels in ``~/.triton/cache``), so a restart does not
    benchmark again."""
    if interpret:  # one small tile: the interpreter runs each program in numpy, and tests want speed
        configs, tuning = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})], {}
    else:
        configs, tuning = _gpu_configs(), {"do_bench": _quick_bench, "cache_results": True}
    jitted = triton.jit(_int8_mm, do_not_specialize=["M", "M_BUCKET"])
    even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(jitted)
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune},
                           **tuning)(even_k)


# ---------------------------------------------------------------------------------------------- wrappers


def _check(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shape and dtype checks only (no values read, so nothing syncs with the device)."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if cb.dtype != torch.int8 or cb.dim() != 2 or cb.shape[1] != x.shape[-1]:
        raise ValueError(f"cb must be int8 [N, K={x.shape[-1]}], got {cb.dtype} {list(cb.shape)}")
    if scb.shape != (cb.shape[0],):
        raise ValueError(f"scb must be [N={cb.shape[0]}], got {list(scb.shape)}")
    if bias is not None and bias.shape != (cb.shape[0],):
        raise ValueError(f"bias must be [N={cb.shape[0]}], got {list(bias.shape)}")


def dequant_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The large-M path (and the reference off the GPU): widen W to ``x.dtype`` (one rounding a weight),
    then ``F.linear``. Transient memory: one ``[N, K]`` weight in ``x.dtype``."""
    w = cb.to(x.dtype) * (scb.float() * _INV_127).to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _launch(x2: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
            interpret: bool) -> torch.Tensor:
    """Run the kernel on ``x2 [M, K]`` (M <= MAX_KERNEL_ROWS); returns ``[M, N]`` in ``x2.dtype``."""
    (m, k), n = x2.shape, cb.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    cb = cb if cb.stride(1) == 1 else cb.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _kernel(interpret)[grid](
        x2, cb, scb, scb if bias is None else bias, y, m, n, k, row_bucket(m),
        x2.stride(0), x2.stride(1), cb.stride(0), cb.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DOT_F32=interpret or x2.dtype == torch.float32)
    return y


def int8_weight_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (cb * scb[:, None] / 127).T + bias`` in ``x.dtype``, accumulated in fp32.

    x: ``[..., K]`` bf16, fp16 or fp32. cb: int8 ``[N, K]``. scb: ``[N]`` (float32 absmax per row, as
    bitsandbytes stores it). bias: ``[N]`` or None, any float dtype. Returns ``[..., N]``.

    The Triton kernel runs when x is on a CUDA device (or TRITON_INTERPRET=1) and has at most
    ``MAX_KERNEL_ROWS`` rows once flattened; otherwise the weight is dequantized and torch multiplies.
    """
    _check(x, cb, scb, bias)
    x2 = x.reshape(-1, x.shape[-1])
    interpret = interpreting()
    if x2.shape[0] > MAX_KERNEL_ROWS or not (x2.is_cuda or interpret):
        y = dequant_matmul(x2, cb, scb, bias)
    else:
        y = _launch(x2, cb, scb, bias, interpret)
    return y.reshape(*x.shape[:-1], cb.shape[0])
