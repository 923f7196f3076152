"""The int8 weight-only GEMV with the MLP's ``silu(gate) * up`` fused into its x loads (issue 18).

A Llama MLP's decode step runs ``silu_mul`` (``silu_mul.py``: one launch, ~2 us) and then the down projection's
GEMV on its output. Here the GEMV tiles of ``int8_matmul._int8_mm`` (``BLOCK_M == 1``, constexpr ``GATED``)
load the gate and up rows instead and compute ``silu(gate) * up`` per element as they load it, with
``silu_mul``'s roundings (SiLU in fp32 rounded to the activations' dtype, then the product rounded), so the
values multiplied are the very ones ``silu_mul`` writes: with the same tiles, the output equals ``silu_mul``
followed by ``int8_weight_matmul`` bit for bit. Every program loads its x tiles anyway; each recomputes the
SiLU of the elements it loads (``exp`` and a division each, against the int8 weight's reads). ``store_act``:
the programs of column block 0 also write the product row (the input of a LoRA delta on the projection).

The fused kernel runs only the tiles the plain kernel would launch for this shape at one row (``small_m_config``:
the tuned choice, which must be a GEMV one); where the tuned choice is a tensor-core tile, or nothing was tuned
yet, or the shapes do not fit, ``gated_config`` is None and the caller runs ``silu_mul`` and the plain kernel.
"""

from __future__ import annotations

import torch

from .int8_matmul import _check, _small_m, small_m_config
from .support import interpreting


def gated_config(gate: torch.Tensor, up: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                 bias: torch.Tensor | None = None) -> dict | None:
    """The GEMV tiles ``gated_matmul`` runs for these, or None where it does not take them: gate and up one row
    each (any leading dims of size 1) of one shape, dtype and stride, unit column stride, on a CUDA device (or
    under the interpreter); K a multiple of 4; and the tiles the plain kernel launches at one row for this
    weight (tuned) are GEMV tiles."""
    k = gate.shape[-1]
    if not (gate.shape == up.shape and gate.numel() == k and gate.dtype == up.dtype and gate.device == up.device
            and gate.stride(-1) == 1 and up.stride(-1) == 1 and k % 4 == 0 and cb.dim() == 2
            and cb.shape[1] == k and (gate.is_cuda or interpreting())):
        return None
    config = small_m_config(gate.reshape(1, k), cb, scb, bias, interpreting())
    return config if config is not None and config["BLOCK_M"] == 1 else None


def gated_matmul(gate: torch.Tensor, up: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                 bias: torch.Tensor | None = None, store_act: bool = False,
                 config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``silu_mul(gate, up) @ (cb * scb[:, None] / 127).T + bias`` for one row, ``[..., N]`` in gate's dtype, in
    one launch (plus the split-K reduction where the tiles split K). ``config``: GEMV tiles (``BLOCK_M`` 1), else
    ``gated_config``'s (which must not be None). Returns ``(y, act)``: ``act`` the product row (gate's shape,
    contiguous) where ``store_act``, else None."""
    _check(gate, cb, scb, bias)
    config = config or gated_config(gate, up, cb, scb, bias)
    if config is None:
        raise ValueError("no GEMV tiles for these operands at one row (gated_config is None)")
    k = gate.shape[-1]
    act = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype) if store_act else None
    y = _small_m(gate.reshape(1, k), cb, scb, bias, interpreting(), config=config,
                 gated=(up.reshape(1, k), None if act is None else act.view(1, k)))
    return y.reshape(*gate.shape[:-1], cb.shape[0]), act
