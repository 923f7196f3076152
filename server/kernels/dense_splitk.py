"""Float weights at 2-64 rows through the split-K decode kernel, so that a LoRA shrink can run in its launch
(issue 18).

At a decode step of 32 rows on 32 LoRA adapters a bf16 step is 0.940-0.946 of the base-only step's speed on the
H200 (bench/NOTES.md), against the 0.95 wanted. The largest LoRA pieces left are the q/k/v shrink (12.6 MB of A a
layer in ~6 us of a launch of its own, 2.1 TB/s) and the rotary kernel's B reads. For an int8 base the shrink can
run as extra programs of the int8 split-K matmul's own launch (``int8_shrink.py``), in the SMs that the matmul's
last wave leaves idle. A float base's matmuls at 2-64 rows are cuBLAS's (``F.linear``), which can host nothing.

This module runs a float weight (bf16, fp16; fp32 too, the GPU parity suite's) through the same split-K kernel
(``int8_decode_kernels._int8_mm`` with ``SCALED`` off: the weight read as it is, no row scale), with tiles of
its own (``int8_configs._dense_configs``, tuned per row bucket like the int8 ones), so that ``int8_shrink``'s
``matmul_and_shrink`` takes a float weight too. Whether that pays depends on how the kernel's bf16 tiles compare
with cuBLAS at those rows, which only the GPU says: ``warm_up`` tunes the fused q/k/v and gate/up shapes and times
each against ``F.linear`` as a decode step runs them (``step_judge.in_step_us``); ``bench/pdl_bench.py --switch
dense`` times whole decode steps both ways. ``IN_DECODE`` switches it for the own decoder's float matmuls (the
fused q/k/v and gate/up, o_proj, down_proj, lm_head: ``Decoder.splitk_weights``), on since timed on an H100: a
matmul with a LoRA shrink to host takes the kernel wherever its bucket is tuned
(``hosts_shrink``), one without only where the warm-up found the kernel no slower than cuBLAS (``chosen``), so
that a base-only step keeps cuBLAS's speed. Nothing here tunes inside a call the engine makes: a shape not tuned
keeps ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .int8_linear import Int8WeightOnlyLinear
from .support import interpreting, triton_available

if TYPE_CHECKING:
    from .rms_norm import OutputDelta

# The engine's switch: the own decoder's float matmuls at 2-64 rows of x (a decode step's rows, or a prefill of
# that few tokens) through the split-K kernel (where ``warm_up`` tuned the row bucket), their LoRA shrinks in its
# launch where ``int8_shrink.IN_MATMUL`` is on too. On since pdl_bench --switch dense on an H100 (3668cf5,
# bench/RESULTS.md), bf16, ms a step on / off: 8 rows 6.431 / 6.626, 32 rows 9.042 / 9.203, 32 rows on 32 LoRA
# adapters 9.484 / 9.689; the GPU parity suite (fp32 and int8) passed with it on. Not yet timed on the H200.
IN_DECODE = True
MIN_ROWS = 2  # one row is the float GEMV's (dense_gemv.py)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BUCKETS = (2, 4, 8, 16, 32, 64)  # the split-K kernel's row buckets past one row (int8_matmul.row_bucket)


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``splitk_linear`` takes these: 2 to 64 rows once flattened, x and a 2-D weight of one float dtype on
    one device where the kernel runs (``support.triton_available``), the weight contiguous along K (it is read in
    place), a bias of N entries or none."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.dim() >= 1 and MIN_ROWS <= rows <= BUCKETS[-1] and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.dtype in _DTYPES and weight.dtype == x.dtype and x.device == weight.device
            and weight.stride(1) == 1 and (bias is None or bias.shape == (weight.shape[0],))
            and triton_available(x.device))


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """``int8_matmul._CHOSEN``'s key for these (the rows' bucket, the shapes, dtypes and device)."""
    from .int8_matmul import _small_key, row_bucket

    rows = x.numel() // x.shape[-1]
    return _small_key(False, row_bucket(rows), x.reshape(rows, -1), weight, None, bias)


def tuned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel has its tiles for these rows' bucket (``warm_up`` tuned them; the interpreter: always)."""
    if interpreting():
        return True
    from .int8_matmul import _CHOSEN

    return _key(x, weight, bias) in _CHOSEN


def hosts_shrink(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the engine runs the kernel for these with a LoRA shrink in its launch: ``IN_DECODE``, ``fits`` and
    ``tuned`` (whatever ``warm_up`` timed: the shrink's own launch is what it saves)."""
    return IN_DECODE and fits(x, weight, bias) and tuned(x, weight, bias)


def chosen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the engine runs the kernel for these with no shrink to host: ``IN_DECODE``, ``fits``, and ``warm_up``
    tuned the bucket and found it no slower than ``F.linear`` (the interpreter: always, so that the CPU tests run
    it)."""
    return IN_DECODE and fits(x, weight, bias) and (interpreting() or _key(x, weight, bias) in _FASTER)


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``fits`` must hold) through the split-K kernel: ``[..., N]`` in x's dtype, summed in
    fp32 (each split's in order, the splits in order). ``config``: launch kwargs instead of the bucket's tuned
    tiles (tuning them now on a GPU's first call of a bucket: never inside a graph capture, ``warm_up`` first)."""
    from .int8_matmul import _small_m

    x2 = x.reshape(-1, x.shape[-1])
    y = _small_m(x2, weight, None, bias, interpreting(), config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def shrinks_in_launch(weight: torch.Tensor) -> bool:
    """Whether a LoRA shrink may run in this weight's split-K launch (``matmul_and_shrink``): ``IN_DECODE`` and
    ``int8_shrink.IN_MATMUL`` on, the kernel available on the weight's device. Asked before a step gathers the
    shrink's tables."""
    if not IN_DECODE or weight.dtype not in _DTYPES or not triton_available(weight.device):
        return False
    from . import int8_shrink

    return int8_shrink.IN_MATMUL


def matmul_and_shrink(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      slots: torch.Tensor, rank: int):
    """``(splitk_linear(x, weight, bias), lora_shrink(x rows, lora_a, slots, rank))`` in one launch where
    ``hosts_shrink`` (``int8_shrink.matmul_and_shrink`` on the float weight); else None, nothing launched."""
    if not hosts_shrink(x, weight, bias):
        return None
    from .int8_shrink import matmul_and_shrink as in_launch

    return in_launch(x, weight, None, bias, lora_a, slots, rank)


def layer_shrinks_in_launch(layer: nn.Module) -> bool:
    """Whether ``layer`` (the engine's int8 kernel layer, or a plain float ``nn.Linear``) may run a LoRA shrink in
    its split-K launch: the int8 layer's ``shrinks_in_launch``, or ``shrinks_in_launch`` of the float weight."""
    if isinstance(layer, Int8WeightOnlyLinear):
        return layer.shrinks_in_launch()
    return type(layer) is nn.Linear and shrinks_in_launch(layer.weight)


def layer_with_shrink(layer: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, rank: int):
    """``layer``'s output for x and a LoRA shrink of x's rows (``lora_a`` ``[G, R, S, in]``) in its one split-K
    launch (``Int8WeightOnlyLinear.with_shrink``, or ``matmul_and_shrink`` for a float ``nn.Linear``); None where
    the kernel does not take them (nothing launched). Ask ``layer_shrinks_in_launch`` first."""
    if isinstance(layer, Int8WeightOnlyLinear):
        return layer.with_shrink(x, lora_a, slots, rank)
    return matmul_and_shrink(x, layer.weight, layer.bias, lora_a, slots, rank)


def layer_with_expand(layer: nn.Module, x: torch.Tensor, delta: OutputDelta) -> tuple[torch.Tensor, OutputDelta] | None:
    """``layer``'s output for x and ``delta``'s sums (its shrink done before the launch: o_proj's, in the attention
    merge) in its one split-K launch: the int8 layer's where ``int8_expand.IN_MATMUL`` is on
    (``Int8WeightOnlyLinear.with_expand``), or a float ``nn.Linear``'s where ``int8_expand.FLOAT_IN_MATMUL`` is on
    and the kernel would host a shrink for it (``hosts_shrink``: the bucket tuned); None where the kernel does not
    take them (nothing launched)."""
    from . import int8_expand

    if isinstance(layer, Int8WeightOnlyLinear):
        return layer.with_expand(x, delta) if int8_expand.IN_MATMUL else None
    if (not int8_expand.FLOAT_IN_MATMUL or type(layer) is not nn.Linear
            or not hosts_shrink(x, layer.weight, layer.bias)):
        return None
    return int8_expand.matmul_and_expand(x, layer.weight, None, layer.bias, delta)


# (row bucket, N, K) -> (the kernel's us, F.linear's us) for every shape and bucket ``warm_up`` timed
_JUDGED: dict[tuple[int, int, int], tuple[float, float]] = {}
# ``_key``s of the buckets ``warm_up`` timed, and of those where the kernel was no slower than F.linear (``chosen``
# without a shrink)
_TIMED: set[tuple] = set()
_FASTER: set[tuple] = set()


@torch.no_grad()
def warm_up(weights: Iterable[tuple[torch.Tensor, torch.Tensor | None]], buckets: Sequence[int] = BUCKETS,
            ) -> dict[tuple[int, int, int], tuple[float, float]]:
    """Tune the kernel's tiles for each distinct ``(weight, bias)`` shape at each row bucket (float weights on a
    device where the kernel runs; others are skipped), then time the tuned kernel against ``F.linear`` on zero rows
    of the bucket's size as a decode step runs them (``step_judge.in_step_us``: after an RMSNorm, in a CUDA graph,
    over copies of the weight that L2 cannot hold). Call before any CUDA graph capture. Where the kernel was no
    slower, it runs for that bucket's matmuls without a shrink too (``chosen``); elsewhere only those hosting a
    shrink take it (``hosts_shrink``). Each (bucket, shape, dtypes) is timed once a process (the engine warms up
    at each start; tests start many). Returns ``{(bucket, N, K): (kernel us, F.linear us)}``, each with its norm's
    time, for these weights' buckets among ``judgements``."""
    from .step_judge import in_step_us

    seen = set()
    for weight, bias in weights:
        for bucket in buckets:
            x = torch.zeros(bucket, weight.shape[1], device=weight.device, dtype=weight.dtype)
            key = (bucket, *weight.shape)
            if key in seen or not fits(x, weight, bias):
                continue
            seen.add(key)
            splitk_linear(x, weight, bias)  # tunes the bucket (once a process: int8_matmul._CHOSEN keeps it)
            full = _key(x, weight, bias)
            if _times_on(weight.device) and full not in _TIMED:  # once a process (an engine start each; tests: many)
                ours, theirs = in_step_us(x, weight, (lambda a, w: splitk_linear(a, w, bias),  # noqa: B023
                                                      lambda a, w: F.linear(a, w, bias)))  # noqa: B023
                _JUDGED[key] = (ours, theirs)
                _TIMED.add(full)
                if ours <= theirs:
                    _FASTER.add(full)
    return {key: _JUDGED[key] for key in seen if key in _JUDGED}


def _times_on(device: torch.device) -> bool:
    """Whether ``warm_up`` times the kernel against ``F.linear`` on ``device``: a CUDA one (CUDA graphs)."""
    return device.type == "cuda"


def judgements(clear: bool = False) -> dict[tuple[int, int, int], tuple[float, float]]:
    """``warm_up``'s times so far: ``(bucket, N, K)`` -> (the kernel's us, ``F.linear``'s us); ``clear``: forget them
    once returned (a bench that prints each once)."""
    judged = dict(_JUDGED)
    if clear:
        _JUDGED.clear()
    return judged
