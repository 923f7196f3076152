"""The engine's kernel swaps on a GPU, made once when the engine starts and before any CUDA graph capture:
bitsandbytes' int8 matmul for the weight-only Triton kernel, transformers' RMSNorm for the fused one. Both
change the base model in place; their switches are EngineConfig.int8_kernel and EngineConfig.fused_kernels.
"""

from __future__ import annotations

import inspect
import logging
import textwrap

from torch import nn

from ..model import BaseModel

log = logging.getLogger(__name__)


def use_int8_kernel(base: BaseModel, enabled: bool, max_rows: int = 64) -> int:
    """Swap bitsandbytes' int8 matmul (which also quantizes activations, 3-5x slower than bf16 at decode batch
    sizes) for the weight-only kernel over the same int8 weights, and tune it now, before any graph capture.
    Returns the number of layers swapped."""
    from ..kernels import int8_kernel_available, warm_up
    from ..kernels import use_int8_kernel as swap

    if base.quantization != "int8" or not enabled or not int8_kernel_available(base.device):
        return 0
    swapped = swap(base.model)
    warm_up(base.model, base.dtype, max_rows=max_rows)
    log.info("int8 weight-only kernel in %d layers", swapped)
    return swapped


def use_fused_norms(base: BaseModel, enabled: bool) -> int:
    """Swap the model's RMSNorms (8 small kernels each in transformers, 65 of them in a 7B decode step) for
    one Triton kernel each, same math (bf16 outputs bit-identical on an H200). Returns how many."""
    from ..kernels import fused_rms_norm_available, use_fused_rms_norm

    if not enabled or not fused_rms_norm_available(base.device):
        return 0
    names = fusable_norms(base.model)
    swapped = use_fused_rms_norm(base.model, names)
    log.info("fused RMSNorm kernel in %d norms (%s)", swapped, ", ".join(names) or "none fusable")
    return swapped


def fusable_norms(model: nn.Module) -> tuple[str, ...]:
    """Class names of the model's norms whose ``forward`` is, line for line, transformers' Llama RMSNorm (the
    fused kernel's math): Mistral's, Qwen2/3's, Phi-3's, GLM's. Any other is left as it is, e.g. Gemma's,
    which scales by ``1 + weight`` and casts after the product: never swap what the kernel does not reproduce."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    classes = {type(m) for m in model.modules() if "RMSNorm" in type(m).__name__}
    return tuple(sorted(c.__name__ for c in classes if same_forward(c, LlamaRMSNorm)))


def same_forward(cls: type, reference: type) -> bool:
    """Whether ``cls.forward`` is ``reference.forward`` line for line (so computes the same); False where either
    has no source to compare."""
    source = _source(getattr(cls, "forward", None))
    return source is not None and source == _source(reference.forward)


def _source(function: object) -> str | None:
    try:
        return textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    except (OSError, TypeError):  # no source to compare (built-in, compiled): not provably the same
        return None
