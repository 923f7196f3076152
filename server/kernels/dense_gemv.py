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
tunes its tiles and then times it against ``F.linear`` on the same weight as a decode step runs them (in a CUDA
graph, after an RMSNorm); ``linear`` takes the kernel for the shapes where ``F.linear`` was not clearly faster
(``chosen``), and ``F.linear`` for everything else (more rows, fp32, a shape never
warmed up, the CPU). Nothing is tuned inside a call, so a captured step never benchmarks.
"""

from __future__ import annotations

import functools

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
          INTERPRETED: tl.constexpr = False):
    """Rows ``[program_id(0) * BLOCK_N, ...)`` of y: ``y[n] = sum_k x[k] * W[n, k] (+ bias[n])``, x and y one
    contiguous row each. ``K_TILES = cdiv(K, BLOCK_K)`` is a constexpr: Triton 3.6's interpreter (the GPU
    image's) cannot take a tensor loop bound.

    ``GLU`` (an MLP's fused gate/up weight, ``[2 N, K]``: gate's N rows, then up's): the program's tile holds
    ``BLOCK_N / 2`` gate rows and the up rows of the same outputs, interleaved (gate ``j`` at tile row ``2 i``, up
    ``j`` at ``2 i + 1``), and it stores ``silu(gate) * up`` for those ``j``, each factor rounded to y's dtype
    first and the SiLU and product with ``silu_mul.py``'s roundings: the values of ``silu_mul`` on this kernel's
    gate/up output, bit for bit, with the same tiles (each row's sum does not depend on the tile's other rows)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if GLU:  # tile row 2 i: gate row j, 2 i + 1: up row j (N + j), j = the program's i-th output
        rows = (tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2) % N + (tl.arange(0, BLOCK_N) % 2) * N
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
    else:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def _triton():
    """Import Triton (once) into this module's globals, with ``libdevice``, where the kernel's body finds them."""
    return triton_into(globals(), libdevice=True)


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

# (N, K, dtype, bias dtype, device) -> the tuned launch config, for the shapes where warm-up kept the kernel
_CHOSEN: dict[tuple, dict] = {}
# The same keys -> (the kernel's us, F.linear's us, its tuned config), for every shape ``warm_up`` judged
_JUDGED: dict[tuple, tuple[float, float, dict]] = {}


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


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | None,
            glu: bool = False) -> torch.Tensor:
    n, k = weight.shape
    out = n // 2 if glu else n
    y = torch.empty((*x.shape[:-1], out), device=x.device, dtype=x.dtype)
    interpret = interpreting()
    kernel, tuner = _kernels(interpret)
    meta = {"HAS_BIAS": bias is not None, "ROUND_BF16": interpret and x.dtype == torch.bfloat16,
            **pdl_launch(x.device)}
    if glu:  # the constexprs' defaults otherwise: the plain kernel's compiled variant is unchanged
        meta.update(GLU=True, INTERPRETED=interpret)
    args = (x, weight, weight if bias is None else bias, y, out, k, weight.stride(0))
    config = config or _CHOSEN.get(_key(x, weight, bias)) or (_INTERPRET_CONFIG if tuner is None else None)
    if config is None and glu:  # the plain kernel's tiles for the weight, tuned now (``gemv``'s first call)
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


# The kernel is kept unless F.linear is faster than this share of the kernel's judged time: after the judge's
# norm, the next kernel is the next call's norm, whose start hides little of the kernel's tail; in a decode
# step it is the next matmul, whose weight stream starts under PDL while the kernel's last tiles still run
# (F.linear's successor waits for it to drain). The H200 at 32f3b76: 22016x4096 judged 51.9 us against 50.6
# (2.6% slower), yet the step with the kernel there was 0.07 ms faster (3.908 against 3.981 ms, pdl_bench
# --switch gemv); every other Llama-2-7B shape was faster in the step and in the judge.
_KERNEL_MARGIN = 0.95


@torch.no_grad()
def warm_up(weights: list[tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, bool]],
            ) -> dict[tuple[int, int], tuple[float, float]]:
    """Tune the kernel for each distinct ``(weight, bias)`` shape (bf16/fp16 weights on a CUDA device where the
    kernel runs; others are skipped), time its choice against ``F.linear`` on a zero row the way a decode step
    runs them (``step_judge.in_step_us``: back to back in a CUDA graph, under PDL where it is on, over copies of
    the weight that L2 cannot hold), and keep the kernel unless ``F.linear`` was more than 5% faster
    (``_KERNEL_MARGIN``).
    A weight given with ``True`` (an MLP's fused gate/up, whose one-row step folds the SiLU product into the
    GEMV: ``silu_glu``) is judged with it: ``silu_glu`` against ``F.linear`` then ``silu_mul`` (the choice is
    per shape). Call before any CUDA graph capture. Returns ``{(N, K): (kernel us, F.linear us)}``, each after
    its RMSNorm (``in_step_us``).

    Timing each call alone after an L2 flush (``triton.testing.do_bench``, the autotuners' timer then) misjudged: a
    wrapper's host time, longer than the flush before it, was counted as the call's (the H200 at ecf03fe:
    4096x4096 kernel 50.7 us against F.linear 18.9 us, F.linear chosen; inside the decode step the kernel was
    0.15 ms a step faster, pdl_bench --switch gemv)."""
    from .silu_mul import silu_mul
    from .step_judge import in_step_us

    times: dict[tuple[int, int], tuple[float, float]] = {}
    for weight, bias, *glu in weights:
        x = torch.zeros(1, weight.shape[1], device=weight.device, dtype=weight.dtype)
        key = _key(x, weight, bias)
        if (tuple(weight.shape) in times or key in _CHOSEN or not fits(x, weight, bias)
                or not dense_gemv_available(weight.device)):
            continue
        gemv(x, weight, bias)  # tunes
        config = _kernels(False)[1].best_config.all_kwargs()
        if glu and glu[0]:
            runs = (lambda a, w: silu_glu(a, w, bias, config=config),  # noqa: B023
                    lambda a, w: silu_mul(*F.linear(a, w, bias).chunk(2, dim=-1)))  # noqa: B023
        else:
            runs = (lambda a, w: gemv(a, w, bias, config=config),  # noqa: B023
                    lambda a, w: F.linear(a, w, bias))  # noqa: B023
        ours, theirs = in_step_us(x, weight, runs)
        times[tuple(weight.shape)] = (ours, theirs)
        _JUDGED[key] = (ours, theirs, config)
        if keeps_kernel(ours, theirs):
            _CHOSEN[key] = config
    return times


def keeps_kernel(ours_us: float, theirs_us: float) -> bool:
    """The judge's verdict: the kernel, unless ``F.linear`` took less than ``_KERNEL_MARGIN`` of its time."""
    return theirs_us >= _KERNEL_MARGIN * ours_us


def judgements() -> dict[tuple, tuple[float, float, bool]]:
    """``warm_up``'s verdicts so far: ``(N, K, dtype, bias dtype, device)`` -> (the kernel's us, ``F.linear``'s
    us, whether ``linear`` runs the kernel for that shape now)."""
    return {key: (ours, theirs, key in _CHOSEN) for key, (ours, theirs, _) in _JUDGED.items()}


def choose(key: tuple, kernel: bool) -> None:
    """Override ``warm_up``'s verdict for a judged shape (``judgements``' key): the kernel with its tuned tiles,
    or ``F.linear``. For benches that time the choice inside a decode step; captured graphs keep the old one."""
    if kernel:
        _CHOSEN[key] = _JUDGED[key][2]
    else:
        _CHOSEN.pop(key, None)
