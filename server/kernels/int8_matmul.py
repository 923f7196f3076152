"""A weight-only int8 matmul: ``y = x @ (CB * SCB[:, None] / 127).T + bias``, in Triton.

Why: bitsandbytes' LLM.int8 matmul (threshold 0) quantizes the activations to int8 and runs an int8 GEMM
with a dequantizing epilogue; at decode's few rows that path is 3 to 5 times slower than a bf16 matmul on an
H200. Decode is memory bound: each step reads every weight once and does only 2 flops with it per row.
These kernels read the int8 weight (1 byte per weight, half of bf16), widen each tile to the activation
dtype in registers, accumulate in fp32 on the tensor cores and apply the per-row scale once per output
element after the K loop. Activations stay in their dtype (no activation quantization), so the result is
closer to the dequantized weight's exact product than bitsandbytes' own.

Layout (as bitsandbytes keeps a ``Linear8bitLt`` on the device): ``CB`` int8 ``[N, K]`` row major (one output
feature a row), ``SCB`` float32 ``[N]`` (the row's absmax), so ``W[n, k] = CB[n, k] * SCB[n] / 127``.

Two paths, by the rows ``M`` of ``x`` (flattened):

* ``M <= MAX_KERNEL_ROWS`` (64, decode): a split-K kernel. Program ``(m, n, s)`` reduces split ``s`` of the K
  tiles of one ``[BLOCK_M, BLOCK_N]`` output tile. ``SPLIT_K`` (1 to 16) is tuned with the tiles: a 4096-row
  weight at BLOCK_N 64 gives only 64 programs for the H200's 132 SMs, and splitting K multiplies them. With
  ``SPLIT_K > 1`` the programs write fp32 partials to a workspace ``[SPLIT_K, M, N]`` (``torch.empty`` at each
  call: no host sync, capturable) and a second small kernel sums them in a fixed order (deterministic, no
  atomics) and applies the row scale, bias and output cast. The autotuner times both kernels together.
* ``M > MAX_KERNEL_ROWS`` (prefill; ``int8_gemm.py``): a tiled GEMM kernel (BLOCK_M 64/128, grouped tile
  order for L2 reuse), tuned per row bucket 128, 256, ..., 4096 (larger M shares the 4096 bucket). It reads the
  int8 weight in place instead of dequantizing it to ``x.dtype`` first (a write and a re-read of a bf16 copy).

The tile configs are in ``int8_configs.py``. The split-K kernel also serves float weights at 2-64 rows for
``dense_splitk.py`` (``_small_m`` with ``scb`` None: no scale, tiles and a tuner of their own), so that a LoRA
shrink can run in a bf16 base's matmul launch as in an int8 one's (``int8_shrink.py``).

``dequant_matmul`` (widen the weight, then torch) remains the path where no kernel can run (``x`` not on a
CUDA device and no TRITON_INTERPRET), and the reference.

CUDA graphs: the launches have no host sync and no value-dependent allocation. The first call for each
(row bucket, N, K, dtypes) autotunes (benchmarks configs, with syncs) and compiles: that must happen before
capture, through ``adapterd.server.kernels.warm_up`` (which also tunes the prefill buckets, so that a
request does not pay for tuning; prefill is not graph-captured, and a bucket not warmed up tunes on its
first call) or eager warm-up forwards. ``M`` is not specialized, so one warm-up call
per bucket covers every row count in it. The small-M path records the chosen config per key (``_CHOSEN``)
and launches it directly afterwards, so the workspace it allocates always fits the split it launches.

Interpreter: with ``TRITON_INTERPRET`` set (read at each call, not at import) the same kernels run on CPU
tensors through Triton's interpreter, with one small tile config per path (the tests use it; they force
other configs through ``_small_m(..., config=...)``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
from triton.errors import TritonError
from triton.runtime.errors import InterpreterError

from .int8_configs import _INTERPRET_SMALL, _dense_configs, _prune_dense, _prune_small, _small_configs, even_k
from .int8_decode_kernels import _int8_mm, _splitk_reduce  # the kernels' source (tests compile _int8_mm from here)
from .int8_gemm import MAX_GEMM_BUCKET, _large_m, gemm_bucket  # noqa: F401 (the prefill path; tests reach it here)
from .support import interpreting, pdl_launch, quick_bench, tuner_choices

MAX_KERNEL_ROWS = 64  # rows of x served by the split-K decode kernel; more rows go to the tiled GEMM kernel
MAX_SPLIT_K = 16
# Row buckets up to this launch with programmatic dependent launch (``support.pdl_enabled``); larger ones
# without. bench/pdl_bench.py on the H200 (f2be504), the engine's decode step PDL off over on: int8 1 row 1.076,
# 4 rows 1.019, 8 rows 1.013, 16 rows 0.994, 32 rows 0.925 (7.77 against 8.40 ms), 64 rows 1.002; bf16, whose
# other kernels are the same, 1.001 at 32 rows: the tensor-core tiles are the part that loses.
PDL_MAX_BUCKET = 8
# Past PDL_MAX_BUCKET, a split-K launch's reduction may launch with PDL (``_splitk_reduce``'s ``USE_PDL``): the
# matmul before it triggers nothing, so the reduction still starts once the matmul ends, but it lets the kernel
# after it start at once and stream what no kernel writes (the rotary kernel's and the add + norm's LoRA B tiles,
# the next matmul's first weight tile) while the partials are summed. pdl_bench --switch reduce on the H200
# (e12ddf1, bench/RESULTS.md), int8, ms a step on / off: 32 rows 6.313 / 6.406, 32 rows on 32 LoRA 6.759 / 6.829.
# On since the GPU parity suite passed with it on (fdf7939).
REDUCE_PDL = True
_INV_127 = 1.0 / 127.0  # bitsandbytes' absmax scale: W = CB * SCB / 127
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_REDUCE_BLOCK = 512  # outputs per program of the split-K reduction

log = logging.getLogger(__name__)


def row_bucket(m: int) -> int:
    """The small-M kernel's autotune bucket of ``m`` rows: the next power of two, at most ``MAX_KERNEL_ROWS``."""
    return min(MAX_KERNEL_ROWS, triton.next_power_of_2(max(m, 1)))




@functools.cache
def _jitted(interpret: bool):
    """(the split-K kernel, the reduction), jitted at the first call of each mode (``triton.jit`` reads
    TRITON_INTERPRET when it wraps the function, so building lazily lets the interpreter be switched on at run
    time); the int8 and the float weights' tuners share them (``_small_kernels``)."""
    return (even_k(triton.jit(_int8_mm, do_not_specialize=["M", "M_BUCKET"])),
            triton.jit(_splitk_reduce, do_not_specialize=["M"]))


@functools.cache
def _small_kernels(interpret: bool, dense: bool = False):
    """(the split-K kernel, its autotuner or None in the interpreter, the reduction); ``dense``: the tuner of
    float weights' tiles (``dense_splitk.py``), else of int8 weights'. The autotuner's choices are cached on disk
    (``cache_results``, keyed by Triton version, GPU target, kernel source, shape key and configs; next to
    the compiled kernels in ``~/.triton/cache``), so a restart does not benchmark again. Its post hook runs
    the reduction after each timed split-K launch, so a config is timed with its reduction."""
    mm, reduce = _jitted(interpret)
    if interpret:
        return mm, None, reduce
    configs, prune = (_dense_configs(), _prune_dense) if dense else (_small_configs(), _prune_small)
    tuner = triton.autotune(configs, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": prune},
                            post_hook=_reduce_hook, do_bench=quick_bench, cache_results=True)(mm)
    return mm, tuner, reduce


def tuned_configs() -> dict[str, str]:
    """The split-K kernel's autotune choices so far, ``"M_BUCKET, N, K, dtypes..."`` -> config (``tuner_choices``)."""
    return tuner_choices(_small_kernels(interpreting())[1])


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
    """Where no kernel runs (and the reference): widen W to ``x.dtype`` (one rounding a weight), then
    ``F.linear``. Transient memory: one ``[N, K]`` weight in ``x.dtype``."""
    w = cb.to(x.dtype) * (scb.float() * _INV_127).to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _reduce(p: torch.Tensor, scb: torch.Tensor, b: torch.Tensor, y: torch.Tensor, has_bias: bool, split: int,
            interpret: bool, pdl: dict[str, bool] | None = None, scaled: bool = True) -> None:
    """Sum the ``[split, M, N]`` fp32 partials at the front of ``p`` into ``y [M, N]`` (scale, bias, cast; not
    ``scaled``: no scale, ``scb`` unread). ``pdl``: ``pdl_launch``'s keywords, or none."""
    m, n = y.shape
    _jitted(interpret)[1][(triton.cdiv(m * n, _REDUCE_BLOCK),)](
        p, scb, b, y, m, n, y.stride(0), y.stride(1), HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=_REDUCE_BLOCK,
        num_warps=4, **(pdl or {}), **({} if scaled else {"SCALED": False}))


def _reduce_hook(nargs: dict, exception: BaseException | None) -> None:
    """The autotuner's post hook: after a timed split-K launch, its reduction (timed with it)."""
    if exception is None and nargs["SPLIT_K"] > 1:
        _reduce(nargs["p_ptr"], nargs["s_ptr"], nargs["b_ptr"], nargs["y_ptr"], nargs["HAS_BIAS"],
                nargs["SPLIT_K"], interpreting(), scaled=nargs.get("SCALED", True))


# The small-M config chosen for each (mode, row bucket, N, K, dtypes, device): after the first (tuning)
# call, launches go straight to the jitted kernel with this config, so the workspace allocated for a launch
# always has the launched split's size (never the autotuner's state at that moment).
_CHOSEN: dict[tuple, dict] = {}


def _small_key(interpret: bool, bucket: int, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None,
               bias: torch.Tensor | None) -> tuple:
    """``_CHOSEN``'s key for these operands at row bucket ``bucket`` (``scb`` None: a float weight's, whose
    dtype the key then holds in its place)."""
    return (interpret, bucket, *cb.shape, x.dtype, cb.dtype if scb is None else scb.dtype,
            None if bias is None else bias.dtype, x.device)


def _small_m(x2: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None, bias: torch.Tensor | None,
             interpret: bool, config: dict | None = None, extra: dict | None = None) -> torch.Tensor:
    """The split-K kernel on ``x2 [M, K]`` (M <= MAX_KERNEL_ROWS); returns ``[M, N]`` in ``x2.dtype``.
    ``scb`` None: ``cb`` is a float weight (``dense_splitk.py``: its own tiles and tuner, no scale; contiguous
    along K, as its callers check). ``config`` (tests): launch kwargs (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
    ``SPLIT_K``, optionally ``num_warps``, ``num_stages``) to run instead of the tuned choice. ``extra``
    (with a config): the kernel's ``SHRINK`` arguments (``int8_shrink.py``) or ``EXPAND`` ones (``int8_expand.py``)
    and ``units``, the programs they need past the matmul's."""
    (m, k), n = x2.shape, cb.shape[0]
    dense = scb is None
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    if config is not None and config["BLOCK_M"] == 1 and (k % 4 or dense):
        raise ValueError(f"the GEMV tiles read 4-byte words of an int8 weight's rows: K must be a multiple of 4, "
                         f"got {k}, and the weight int8, got {cb.dtype}")
    gemv_rows = not dense and row_bucket(m) == 1 and k % 4 == 0  # the GEMV tiles may run: rows of aligned words
    if not dense and (cb.stride(1) != 1 or (gemv_rows and (cb.stride(0) % 4 or cb.data_ptr() % 4))):
        cb = cb.clone(memory_format=torch.contiguous_format)
    mm, tuner, _ = _small_kernels(interpret, dense)
    bucket, s = row_bucket(m), cb if dense else scb  # a float weight's launch has no scale to read
    b = s if bias is None else bias
    key = _small_key(interpret, bucket, x2, cb, scb, bias)
    meta = {"HAS_BIAS": bias is not None, "DOT_F32": interpret or x2.dtype == torch.float32, "INTERPRETED": interpret,
            **(pdl_launch(x2.device) if bucket <= PDL_MAX_BUCKET else {}), **({"SCALED": False} if dense else {})}
    strides = (x2.stride(0), x2.stride(1), cb.stride(0), cb.stride(1), y.stride(0), y.stride(1))
    units, extra = (0, {}) if extra is None else (extra.pop("units"), extra)

    def grid(c: dict) -> tuple[int, int, int]:  # extra units: column blocks past N's (one split), else slices
        m_blocks, n_blocks, split = triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]
        if units and split == 1:
            return m_blocks, n_blocks + triton.cdiv(units, m_blocks), 1
        return m_blocks, n_blocks, split + triton.cdiv(units, m_blocks * n_blocks)

    config = config or _CHOSEN.get(key) or (_INTERPRET_SMALL if tuner is None else None)
    if extra and config is None:
        raise ValueError("a shrink or expand in the matmul's launch needs its tuned config (their callers ask for it)")
    if config is None:  # first call of this key on the GPU: tune, with room for the largest split
        p = torch.empty((MAX_SPLIT_K, m, n), device=x2.device, dtype=torch.float32)
        tuner[grid](x2, cb, s, b, y, p, m, n, k, bucket, *strides, **meta)
        config = _CHOSEN[key] = tuner.best_config.all_kwargs()
    else:  # fp32 either way: the pointer's dtype is part of the compiled kernel's signature
        p = torch.empty((config["SPLIT_K"], m, n) if config["SPLIT_K"] > 1 else (1,), device=x2.device,
                        dtype=torch.float32)
        mm[grid(config)](x2, cb, s, b, y, p, m, n, k, bucket, *strides, **meta, **config, **extra)
    if config["SPLIT_K"] > 1:
        _reduce(p, s, b, y, bias is not None, config["SPLIT_K"], interpret,
                pdl_launch(x2.device) if REDUCE_PDL and bucket > PDL_MAX_BUCKET else None, scaled=not dense)
    return y


def small_m_with_extra(x2: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor | None, bias: torch.Tensor | None,
                       interpret: bool, config: dict, extra: dict, refusal: tuple, refused: set,
                       what: str) -> torch.Tensor | None:
    """``_small_m`` with extra programs (``extra``: ``int8_shrink.py``'s or ``int8_expand.py``'s), or None where
    Triton refuses to build that launch (a compile, ptxas or resource error, raised before anything runs): then
    ``refusal`` joins ``refused`` (that shape is not tried again) and one warning says so, naming the shape and
    ``what`` keeps it. An error of the interpreter, which ran it, is a bug and is raised."""
    if refusal in refused:
        return None
    try:
        return _small_m(x2, cb, scb, bias, interpret, config, extra)
    except TritonError as exc:  # compile, ptxas or resources: before the launch, so nothing ran
        if isinstance(exc, InterpreterError):  # the interpreter ran it: a bug, not a refusal
            raise
        refused.add(refusal)
        log.warning("extra programs in the split-K matmul's launch do not build for %s x %s at %d rows (%s: %s); "
                    "that shape keeps %s", list(cb.shape), x2.dtype, x2.shape[0], type(exc).__name__, exc, what)
        return None


def int8_weight_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (cb * scb[:, None] / 127).T + bias`` in ``x.dtype``, accumulated in fp32.

    x: ``[..., K]`` bf16, fp16 or fp32. cb: int8 ``[N, K]``. scb: ``[N]`` (float32 absmax per row, as
    bitsandbytes stores it). bias: ``[N]`` or None, any float dtype. Returns ``[..., N]``.

    When x is on a CUDA device (or TRITON_INTERPRET=1): the split-K kernel for at most ``MAX_KERNEL_ROWS``
    rows once flattened, the tiled GEMM kernel for more. Otherwise the weight is dequantized and torch
    multiplies.
    """
    _check(x, cb, scb, bias)
    x2 = x.reshape(-1, x.shape[-1])
    interpret = interpreting()
    if not (x2.is_cuda or interpret):
        y = dequant_matmul(x2, cb, scb, bias)
    elif x2.shape[0] <= MAX_KERNEL_ROWS:
        y = _small_m(x2, cb, scb, bias, interpret)
    else:
        y = _large_m(x2, cb, scb, bias, interpret)
    return y.reshape(*x.shape[:-1], cb.shape[0])
