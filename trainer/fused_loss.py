"""The LM head's cross-entropy without the full logits (``--fused-loss``).

The plain path makes ``batch x context x vocab`` logits (4 x 1024 x 32,000 for Llama-2-7B: 262 MB in bf16,
524 MB more once transformers upcasts them to fp32, and as much again for their gradient) only to reduce them
to one number. Here the decoder's last hidden states go straight into a fused linear + cross-entropy:

* only positions whose next token is labelled get logits at all (the Alpaca prompt is masked to -100, so the
  prompt's positions cost nothing);
* liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton, CUDA only) where it imports, else
  ``ChunkedLinearCrossEntropy`` below: a chunk of tokens at a time, logits, log-sum-exp and the gradient of
  the chunk computed in the forward and the logits dropped, so the backward is one multiplication.

The loss is transformers' causal-LM loss exactly: labels shifted by one, -100 ignored, the mean over the
labelled tokens, logits upcast to fp32 before the softmax. ``check_head`` refuses a model whose logits are
not a plain ``lm_head(hidden)`` (soft-capped or scaled logits), comparing against the model's own loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .config import ConfigError

log = logging.getLogger("adapterd.trainer")
IGNORE_INDEX = -100
# Logit elements per chunk: 2^25 fp32 values = 128 MiB (about 1,000 tokens of a 32,000-token vocabulary),
# large enough that each chunk's matmul is efficient, small next to the 7B int8 model's 10 GiB.
CHUNK_ELEMENTS = 1 << 25
# Config keys of families whose logits are not lm_head(hidden): Gemma's soft-cap, Cohere's and Granite's scales.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

LossHead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(x_i W^T + b, t_i) over rows of ``x`` ([N, H], every target labelled), one chunk of rows at a
    time. The gradients are computed in the forward (saved: one [N, H] tensor, and [V, H] in fp32 when the
    weight trains); no chunk's logits outlive its loop iteration."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, chunk: int) -> torch.Tensor:
        n = x.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=x.device)
                  if bias is not None and ctx.needs_input_grad[2] else None)
        for start in range(0, n, chunk):
            rows, t = x[start:start + chunk], target[start:start + chunk]
            logits = F.linear(rows, weight, bias).float()  # as transformers: the head in x's dtype, CE in fp32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_x is None and grad_w is None and grad_b is None:
                continue
            # d(mean CE)/d logits = (softmax - onehot) / n, made in place in the logits' buffer
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(rows.shape[0], device=x.device), t] -= 1.0
            grad.div_(n)
            if grad_b is not None:
                grad_b += grad.sum(0)
            grad = grad.to(x.dtype)
            if grad_x is not None:
                grad_x[start:start + chunk] = grad @ weight
            if grad_w is not None:
                grad_w += (grad.t() @ rows).float()
        ctx.save_for_backward(*(g for g in (grad_x, grad_w, grad_b) if g is not None))
        ctx.present = (grad_x is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out.to(dtype) if present else None
                 for present, dtype in zip(ctx.present, ctx.dtypes, strict=True)]
        return grads[0], grads[1], grads[2], None, None


def chunked_linear_ce(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The torch implementation: ``chunk`` rows a step (default: ``CHUNK_ELEMENTS`` logits a chunk)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(x, weight, bias, target, chunk)


def _liger() -> Callable[..., torch.Tensor] | None:
    """liger-kernel's fused linear cross-entropy (mean over targets != -100), or None where it does not import
    (no liger-kernel, no Triton: every CPU install)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # ImportError, or Triton failing to find a GPU/compiler at import
        log.info("liger-kernel not usable (%s: %s): torch chunked fused loss", type(exc).__name__, exc)
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return lambda x, weight, bias, target: loss(weight, x, target, bias)


def auto_off(device: torch.device) -> str | None:
    """Why ``auto`` keeps the model's own loss on ``device``, or None where it takes a fused head (CUDA). On
    the CPU the plain path stays, so that CPU runs and CI train bit for bit as before the default changed."""
    if device.type != "cuda":
        return f"the run is on {device.type}: the model's own loss, as with --fused-loss off"
    return None


def make_head(base: Any, device: torch.device, backend: str = "auto") -> tuple[LossHead, str]:
    """A loss head ``(hidden [B, T, H], labels [B, T]) -> mean loss`` over ``base``'s output layer and the name
    of its implementation. ``backend``: liger, torch, or auto (liger on CUDA where it imports, else torch)."""
    head = base.get_output_embeddings()
    kernel = _liger() if backend != "torch" and device.type == "cuda" else None
    if backend == "liger" and kernel is None:
        raise ConfigError("fused_loss", "liger: liger-kernel does not import here (it needs CUDA, Triton and "
                          "pip install 'adapterd[train-kernels]'); use torch or auto")
    name = "liger" if kernel is not None else "torch"
    fused = kernel or chunked_linear_ce

    def loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels[:, 1:]  # position t predicts token t + 1, as transformers' ForCausalLMLoss shifts
        keep = target != IGNORE_INDEX
        return fused(hidden[:, :-1][keep], head.weight, head.bias, target[keep])

    return loss, name


def check_head(base: Any, plain_loss: torch.Tensor, fused_loss: torch.Tensor) -> str | None:
    """Why the fused head cannot stand in for ``base``'s own loss, or None when it can: a logit transform in
    the config, or the two losses of one probe batch apart (relative 1e-2: bf16 chunks round differently, a
    wrong head is off by far more)."""
    for key in LOGIT_TRANSFORMS:
        value = getattr(base.config, key, None)
        if value not in (None, 1, 1.0):
            return f"the model's logits are transformed ({key} = {value})"
    plain, fused = float(plain_loss), float(fused_loss)
    if not math.isclose(plain, fused, rel_tol=1e-2):
        return f"the fused loss {fused:.6f} differs from the model's own {plain:.6f} on a probe batch"
    return None
