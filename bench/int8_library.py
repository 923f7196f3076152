"""Library int8 weight-only matmuls over bitsandbytes' int8 weights, for int8_kernel_bench (issue 18): each
built from an ``Int8WeightOnlyLinear`` (``CB`` int8 ``[N, K]``, one output feature a row, ``SCB`` float32
``[N]``, ``W = CB * SCB / 127``), sharing its ``CB`` (no copy, no requantization), so every method reads the
same int8 bytes and computes the same math as our kernel.

* ``int8pack``: ``torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`` = ``(x @ w.T) * scales``.
  Same weight layout as bitsandbytes' ``CB``; the scales are ``SCB / 127`` and must have the activations'
  dtype (PyTorch's CPU kernel rejects float32 scales for bf16 activations), so each row's scale is rounded
  to bf16: a relative error of up to 2^-9 per output row that ours (fp32 scales) does not have.
* ``torchao``: torchao's int8 weight-only tensor (``Int8Tensor``, per-row scale, the layout
  ``Int8WeightOnlyConfig`` makes) holding ``CB`` and ``SCB / 127`` directly (``from_hp`` would requantize the
  dequantized weight with scale absmax / 127.5: other int8 values than bitsandbytes'); its linear is
  ``mm(x, CB.T.to(x.dtype)) * scale``, which torchao runs under ``torch.compile`` (inductor fuses the int8
  widening into the matmul). Optional: measured only where ``import torchao`` works (a bench-only import; it
  is not a dependency of adapterd).

A builder raises ``Unavailable`` with the reason where a method cannot run (torchao missing, no kernel for the
device); the bench prints the reason and leaves the method's cells ``n/a``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

LIBRARY_METHODS = ("int8pack", "torchao")
# Weight-only methods (ours and the libraries) must match x @ W_dequant^T within this share of max |y|:
# bf16 outputs round at 2^-9 (0.2%) of each value, bf16 scales (int8pack, torchao) add up to 2^-9 more,
# fp32 accumulation order differs by ~1e-6. bitsandbytes (activations rounded to int8) is reported, not held
# to it.
TOLERANCE = 0.01


class Unavailable(Exception):
    """The method cannot run here; the message says why."""


def int8pack(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, compile_mode: str | None) -> Callable:
    if cb.device.type == "cpu" and cb.shape[1] % 16:
        # torch 2.13's CPU kernel reads past the row when K is not a multiple of 16: wrong outputs (inf, 1e30)
        # at K = 24, 40, ..., 100, and a segfault at 40x100 with M = 5 (measured; not a documented limit)
        raise Unavailable(f"torch._weight_int8pack_mm on the CPU needs K % 16 == 0 (K = {cb.shape[1]})")
    scales = (scb.float() / 127.0).to(dtype)
    probe = torch.zeros(1, cb.shape[1], dtype=dtype, device=cb.device)
    try:
        torch._weight_int8pack_mm(probe, cb, scales)
    except (RuntimeError, NotImplementedError) as exc:  # no kernel for this device or dtype in this torch
        raise Unavailable(f"torch._weight_int8pack_mm on {cb.device.type}: {str(exc).splitlines()[0][:160]}") from exc
    return lambda x: torch._weight_int8pack_mm(x, cb, scales)


def torchao(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, compile_mode: str | None) -> Callable:
    try:
        from torchao.quantization import Int8Tensor
    except ImportError as exc:  # not installed (bench-only), or built for another torch
        raise Unavailable(f"import torchao: {exc}") from exc
    weight = Int8Tensor(cb, (scb.float() / 127.0)[:, None], [1, cb.shape[1]], dtype)  # PerRow: a scale a row
    linear = _compiled_linear(compile_mode)
    return lambda x: linear(x, weight)


@functools.cache
def _compiled_linear(mode: str | None) -> Callable:
    """``F.linear`` compiled once for all weights (they are inputs, so the weight copies a bench rotates
    through share one graph a shape); each (shape, M) is a recompile, hence the raised limit."""
    if mode is None:
        return torch.nn.functional.linear
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(torch.nn.functional.linear, mode=mode, fullgraph=True, dynamic=False)


BUILDERS: dict[str, Callable[..., Callable]] = {"int8pack": int8pack, "torchao": torchao}
