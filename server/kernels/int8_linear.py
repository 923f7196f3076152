"""Swapping bitsandbytes' ``Linear8bitLt`` layers for ``Int8WeightOnlyLinear`` (the Triton weight-only kernel).

This module imports neither Triton nor bitsandbytes at import time: the daemon runs without Triton (CPU,
or an image without it), and ``int8_kernel_available`` says whether the swap can be made.

Where bitsandbytes 0.50 keeps the int8 weight of a ``Linear8bitLt`` (``has_fp16_weights=False``) once it is on
its device (bitsandbytes/nn/modules.py, ``Int8Params._quantize``, ``Linear8bitLt.init_8bit_state``):

* ``layer.weight`` is an ``Int8Params`` whose data is ``CB``, int8 ``[out, in]`` row major;
* the row scales ``SCB`` (float32 ``[out]``, absmax per row) are on ``layer.weight.SCB`` until the first
  forward, which moves them to ``layer.state.SCB`` (and ``CB`` to ``layer.state.CB``, the same tensor as
  ``layer.weight.data``) and sets the weight's attributes to None.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .support import interpreting, triton_available

if TYPE_CHECKING:
    from .lora_bgmv import LoraPartials
    from .rms_norm import OutputDelta


def int8_kernel_available(device: torch.device | str) -> bool:
    """True when the int8 kernel can run for tensors on ``device`` (``triton_available``)."""
    return triton_available(device)


def _matmul():
    """The kernel's wrapper, imported on first use (it imports Triton)."""
    from .int8_matmul import int8_weight_matmul

    return int8_weight_matmul


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (CB * SCB / 127).T + bias`` with the activations kept in their dtype (no activation
    quantization), through ``int8_weight_matmul``.

    Shares the bitsandbytes layer's tensors: ``weight`` is the layer's own ``Int8Params`` (data = CB, int8
    ``[out, in]``), ``scb`` the same float32 ``[out]`` tensor, ``bias`` the same parameter. Nothing is copied,
    so swapping costs no device memory. ``scb`` is a non-persistent buffer: this module is for serving, and
    its state dict (``weight``, ``bias``) is not meant to be loaded back into bitsandbytes."""

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be int8 [out, in], got {weight.dtype} {list(weight.shape)}")
        if scb.shape != (weight.shape[0],):
            raise ValueError(f"scb must be [out={weight.shape[0]}], got {list(scb.shape)}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scb", scb, persistent=False)
        self.bias = bias

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> Int8WeightOnlyLinear:
        """Wrap a quantized ``bnb.nn.Linear8bitLt`` (on its device already) without copying its tensors."""
        weight = layer.weight
        if weight.dtype != torch.int8:
            raise ValueError("the layer is not quantized (has_fp16_weights=True, or not moved to its device yet)")
        scb = getattr(weight, "SCB", None)
        if scb is None:  # after the layer's first forward, bitsandbytes keeps SCB in its matmul state
            scb = getattr(layer.state, "SCB", None)
        if scb is None:
            raise ValueError("the layer has no row scales (SCB) on its weight or in its state")
        if weight.stride(1) != 1:
            raise ValueError("CB must be row major [out, in] (bitsandbytes' 'row' format)")
        return cls(weight, scb, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .data: the plain int8 tensor (Int8Params overrides .to(), which the large-M path calls)
        return _matmul()(x, self.weight.data, self.scb, self.bias)

    def silu_glu(self, x: torch.Tensor) -> torch.Tensor | None:
        """Where this is an MLP's fused gate/up (gate's rows, then up's) and x one row the one-row kernel takes:
        ``silu(gate) * up`` in one launch (``int8_epilogues.silu_glu``, the two steps' values bit for bit); else
        None."""
        if not int8_kernel_available(x.device):
            return None
        from .int8_epilogues import glu_fits, silu_glu

        cb = self.weight.data
        return silu_glu(x, cb, self.scb, self.bias) if glu_fits(x, cb, self.scb, self.bias) else None

    def rope_append(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, write_pos: torch.Tensor, head_dim: int, q_heads: int) -> torch.Tensor | None:
        """Where this is an attention's fused q/k/v and x one row the one-row kernel takes: the rotated query, with
        the key and value appended to ``keys``/``values`` at ``write_pos[0]``, in one launch
        (``int8_epilogues.rope_append``, the two steps' values bit for bit); else None."""
        if not int8_kernel_available(x.device):
            return None
        from .int8_epilogues import rope_append, rope_fits

        cb, args = self.weight.data, (cos, sin, keys, values)
        if not rope_fits(x, cb, self.scb, self.bias, *args, head_dim, q_heads):
            return None
        return rope_append(x, cb, self.scb, self.bias, *args, write_pos, head_dim, q_heads)

    def shrinks_in_launch(self) -> bool:
        """Whether ``with_shrink`` may run for this layer: the kernel runs on its weight's device and
        ``int8_shrink.IN_MATMUL`` is on (callers ask before they gather a shrink's tables)."""
        if not int8_kernel_available(self.weight.device):
            return False
        from . import int8_shrink

        return int8_shrink.IN_MATMUL

    def with_shrink(self, x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor,
                    rank: int) -> tuple[torch.Tensor, LoraPartials] | None:
        """This layer's output for x and a LoRA shrink of x's rows (``lora_bgmv.lora_shrink(x rows, lora_a, slots,
        rank)``'s partials; ``lora_a`` ``[G, R, S, in]``) in one launch, the shrink as extra programs of the
        matmul's (``int8_shrink.matmul_and_shrink``), where the kernel takes them; else None (nothing launched:
        the caller runs the two). Ask ``shrinks_in_launch`` first."""
        from .int8_shrink import matmul_and_shrink

        return matmul_and_shrink(x, self.weight.data, self.scb, self.bias, lora_a, slots, rank)

    def with_expand(self, x: torch.Tensor, delta: OutputDelta) -> tuple[torch.Tensor, OutputDelta] | None:
        """This layer's output for x and ``delta``'s sums (its shrink done before: o_proj's, in the attention merge)
        in one launch, the expand as extra programs of the matmul's (``int8_expand.matmul_and_expand``), where the
        kernel runs here and takes them; else None (nothing launched)."""
        if not int8_kernel_available(x.device):
            return None
        from .int8_expand import matmul_and_expand

        return matmul_and_expand(x, self.weight.data, self.scb, self.bias, delta)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bnb_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, layer) for every quantized ``Linear8bitLt`` of ``model``."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, bnb.nn.Linear8bitLt) and child.weight.dtype == torch.int8:
                yield parent, name, child


def use_int8_kernel(model: nn.Module) -> int:
    """Replace every quantized ``Linear8bitLt`` of ``model`` (in place) by an ``Int8WeightOnlyLinear`` that
    shares its tensors; returns how many were replaced. Module names do not change. Call it after the
    model is on its device; layers wrapped later (LoRA) see the new module as their base layer, and a wrapper
    made earlier gets its base layer replaced (it is a child module, found like any other)."""
    found = list(_bnb_linears(model))  # collect first: do not mutate the tree while walking it
    for parent, name, layer in found:
        setattr(parent, name, Int8WeightOnlyLinear.from_bnb(layer))
    return len(found)


@torch.no_grad()
def warm_up(model: nn.Module | Iterable[nn.Module], dtype: torch.dtype, max_rows: int = 64,
            prefill_rows: Sequence[int] = (128, 256, 512, 1024, 2048, 4096)) -> int:
    """Autotune and compile the kernels for every distinct layer shape of ``model`` (or of these layers: the
    engine's fused projections, ``engine/fused_projections.py``, which are in no model's tree): the split-K decode
    kernel for every row bucket up to ``max_rows`` rows (1, 2, 4, ..., 64), and the prefill GEMM kernel for
    the row buckets of ``prefill_rows`` (those above ``MAX_KERNEL_ROWS``; by default every bucket, 128 to
    4096, the engine's largest prefill step), so that no later call benchmarks or compiles: call it once
    after ``use_int8_kernel`` and before any CUDA graph capture. A prefill whose row bucket (next power of
    two, up to 4096) was not warmed up tunes on its first call (eager, not graph-captured, but the request
    waits: ~0.3 s, plus compiles the first time). Uses the layers' own weights; inputs are zeros ``[m, in]``
    in ``dtype`` on the layer's device (up to 4096 x 11008 bf16 = 90 MB, and as much output, for
    Llama-2-7B's down projection; freed after). Returns the number of kernel calls made.

    Cost (estimated, not measured here): the first run compiles ~30 decode tile variants and 9 prefill ones
    (about a second each), and times up to 22 configs per (shape, decode bucket) and 9 per (shape, prefill
    bucket) at ~30 ms each; Llama-2-7B has 3 distinct shapes: 21 decode and 18 prefill pairs, ~20 s of
    timing. Both the binaries and the choices are cached on disk by Triton for the next start. Autotuning
    is not thread safe: warm up from one thread. Under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)
    it calls nothing and returns 0: each kernel has one config there and nothing is compiled or timed, and
    running the GEMM at every bucket up to 4096 rows took 24 s of a 33 s engine test."""
    from .int8_matmul import MAX_KERNEL_ROWS, gemm_bucket, int8_weight_matmul, row_bucket

    if interpreting():
        return 0

    buckets = sorted({row_bucket(m) for m in range(1, min(max_rows, MAX_KERNEL_ROWS) + 1)})
    buckets += sorted({gemm_bucket(m) for m in prefill_rows if m > MAX_KERNEL_ROWS})
    seen, calls = set(), 0
    for layer in model.modules() if isinstance(model, nn.Module) else model:
        if not isinstance(layer, Int8WeightOnlyLinear):
            continue
        bias_dtype = None if layer.bias is None else layer.bias.dtype
        key = (layer.in_features, layer.out_features, bias_dtype, layer.weight.device)
        if key in seen:
            continue
        seen.add(key)
        for m in buckets:
            x = torch.zeros(m, layer.in_features, device=layer.weight.device, dtype=dtype)
            int8_weight_matmul(x, layer.weight.data, layer.scb, layer.bias)
            calls += 1
            if m == 1:
                _judge_one_row(x, layer.weight.data, layer.scb, layer.bias)
    return calls


# One-row key (``int8_matmul._small_key``) -> {tile name: us a call in step conditions}, for every key judged
_ONE_ROW_JUDGED: dict[tuple, dict[str, float]] = {}


def tile_name(config: dict) -> str:
    """A GEMV tile's short name: rows, columns a step and warps, e.g. ``"BN 8 BK 1024 w4"``."""
    return f"BN {config['BLOCK_N']} BK {config['BLOCK_K']} w{config['num_warps']}"


def _judge_one_row(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Pick the one-row GEMV tile of this weight shape as a decode step runs it: each GEMV tile of one split
    (``int8_configs.one_row_tiles``) timed by ``step_judge.in_step_us`` (after an RMSNorm, back to back in a CUDA
    graph under PDL, over copies of the weight that L2 cannot hold), the fastest kept in ``int8_matmul._CHOSEN``
    for the key, which the plain GEMV and the rotary and SiLU epilogues all launch. The autotuner's pick (each
    tile alone after an L2 flush) stays where no GEMV tile runs (no CUDA device, K not a multiple of 4, the
    autotuner chose otherwise). On the H200 at e18cce3 the autotuner's pick for 4096x11008 was 0.022 ms a step
    behind the step's best tile (bench/tile_bench.py, which prints this judge's times beside the step's)."""
    from .int8_configs import one_row_tiles
    from .int8_matmul import _CHOSEN, _small_key, _small_m
    from .step_judge import in_step_us

    if not _judged_here(x):
        return
    key = _small_key(False, 1, x, cb, scb, bias)
    tuned = _CHOSEN.get(key)
    if tuned is None or tuned["BLOCK_M"] != 1 or tuned["SPLIT_K"] != 1 or key in _ONE_ROW_JUDGED:
        return  # judged once a process: a later model load keeps what the engine's step tuning chose since
    tiles = [tuned] + [t for t in one_row_tiles() if tile_name(t) != tile_name(tuned)]
    times: dict[str, float] = {}
    for tile in tiles:  # one at a time: a tile that cannot launch here (resources) is skipped
        def run(a: torch.Tensor, w: torch.Tensor, tile: dict = tile) -> torch.Tensor:
            return _small_m(a, w, scb, bias, False, config=tile)

        try:
            times[tile_name(tile)] = in_step_us(x, cb, [run])[0]
        except Exception:  # noqa: BLE001 (Triton's OutOfResources, a capture failure: that tile is not a candidate)
            continue
    _ONE_ROW_JUDGED[key] = times
    best = min(tiles, key=lambda t: times.get(tile_name(t), float("inf")))
    _CHOSEN[key] = best


def _judged_here(x: torch.Tensor) -> bool:
    """Whether ``_judge_one_row`` times tiles for this input: one row on a CUDA device, Triton compiled (the
    interpreter has nothing to time)."""
    from .support import interpreting

    return x.is_cuda and x.shape[0] == 1 and not interpreting()


def one_row_judgements() -> dict[tuple, dict[str, float]]:
    """``warm_up``'s one-row tile judgements so far: ``int8_matmul._small_key`` -> {tile name (``tile_name``): us
    a call after an RMSNorm in a CUDA graph}. The benches print them beside the step's own times."""
    return {key: dict(times) for key, times in _ONE_ROW_JUDGED.items()}
