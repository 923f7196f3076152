"""liger-kernel's training kernels in the base model (``--kernels``): Triton RMSNorm, RoPE and SwiGLU.

Issue 20 asks for well-kept kernels before hand-written ones. liger-kernel (0.8.5, the optional extra
``train-kernels``) has an instance-level patch per model family, ``apply_liger_kernel_to_<family>(rope=,
rms_norm=, swiglu=, cross_entropy=, fused_linear_cross_entropy=, model=)``. It is called here with RoPE, RMSNorm
and SwiGLU on and both losses off (the LM head's loss is ``--fused-loss``'s business, trainer/fused_loss.py).
For the families below it replaces, as read in its ``monkey_patch.py``:

* RMSNorm: each instance's ``forward`` (the final norm, every layer's input and post-attention norms; Qwen3's
  q/k norms too) becomes ``LigerRMSNorm.forward`` (fp32 statistics, "llama" casting, in-place backward);
* SwiGLU: each layer's MLP ``forward`` becomes ``LigerSwiGLUMLP.forward``:
  ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with silu-times-up one Triton kernel. It still calls the
  MLP's own ``gate_proj`` / ``up_proj`` / ``down_proj`` modules, so our int8 dequant forwards
  (``model.use_dequant_int8``) and PEFT's LoRA layers inside them run as before;
* RoPE: ``apply_rotary_pos_emb`` in transformers' modeling module of the family (``modeling_llama``, say)
  becomes ``liger_rotary_pos_emb``. That is a module global: every model of the family in the process gets it
  (the ``LlamaRMSNorm`` / ``LlamaMLP`` class names there are replaced too, for models built later). Acceptable
  in the trainer's own process, which holds one model (the daemon starts every run as a process of its own,
  server/training.py, and never imports this); ``patch`` returns an undo that puts everything back, used when
  the probe refuses the kernels and by the tests.

Why after PEFT's wrapper is made: liger binds ``forward`` on the decoder's norm and MLP modules, which PEFT
leaves in place (LoRA swaps only the target Linear layers inside them, and liger's SwiGLU looks those up at
call time); liger's RMSNorm patch even handles PEFT's ``ModulesToSaveWrapper``. Patching the PEFT model's base
(``get_base_model()``, the same instance) lets the probe run through ``forward_loss``, so P-Tuning v2's prefix
cache (RoPE is applied to the new tokens only, at positions after the prefix) is part of what is checked. Non-
reentrant gradient checkpointing recomputes the patched forwards like any others.

The probe (``model.training_kernels``): one 16-token batch, eval mode, no gradients, the model's own loss and
the decoder's last hidden states before and after patching. The kernels stay only if the losses agree within
``LOSS_RTOL`` and the hidden states within ``HIDDEN_RTOL`` (relative L2 norm); else ``liger`` is refused with a
``ConfigError`` naming ``kernels`` and ``auto`` undoes the patch with a warning.

CUDA only: liger's kernels are Triton. ``auto`` is the default since an H200 measured them (7B int8 LoRA with
the fused loss: 10,047 tokens/s against 8,123 without the kernels, bench/RESULTS.md); on the CPU it is off.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("adapterd.trainer")

# Families whose liger patch was read (0.8.5 monkey_patch.py) and is the same shape: rope, rms_norm and swiglu
# keyword arguments, the model's ``model.norm`` and ``model.layers[i].{mlp, input_layernorm,
# post_attention_layernorm}`` patched, a silu MLP. Other families (Gemma's offset norms and GeGLU, MoE experts,
# vision towers) would need their own reading and probing.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# The probe's tolerances in bf16 on CUDA. Loss: relative 1e-2, as the fused head's check: liger computes the
# norm statistics, the rotation and silu x up in fp32 and rounds once where transformers rounds bf16 after
# each op, which moves a 16-token loss by about 1e-3; a kernel computing something else moves a trained model's
# loss by far more. A random-weight base's loss stays near ln(vocab) whatever the layers do, so the final
# hidden states are compared too (relative L2 norm 1e-1: bf16 rounding differences through 32 layers stay
# within a few 1e-2, a wrong rotation or norm changes the states by a sizeable fraction).
LOSS_RTOL = 1e-2
HIDDEN_RTOL = 1e-1
# Attributes liger's instance patch binds on a module (``_bind_method_to_module`` writes ``__dict__``).
_BOUND = ("forward", "extra_repr", "_get_name")

# liger's three kernels by the keyword its patch takes; ``patch`` applies all of them unless told fewer
# (bench/kernel_grads.py measures each one's gradients alone).
PARTS = ("rope", "rms_norm", "swiglu")

Undo = Callable[[], None]


def unavailable(base: Any, device: torch.device) -> str | None:
    """Why liger's kernels cannot be patched into ``base`` on ``device``, or None when they can be tried."""
    if device.type != "cuda":
        return f"liger-kernel's Triton kernels need a CUDA device, and this run is on {device.type}"
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED:
        return f"model type {model_type!r} is not one that is patched (supported: {', '.join(SUPPORTED)})"
    try:
        liger_apply(model_type)
    except Exception as exc:  # ImportError, or Triton failing at import
        return (f"liger-kernel does not import here ({type(exc).__name__}: {exc}); "
                "pip install 'adapterd[train-kernels]'")
    return None


def liger_apply(model_type: str, parts: tuple[str, ...] = PARTS) -> Callable[[Any], None]:
    """liger-kernel's instance patch for ``model_type`` with the kernels in ``parts`` on (of ``PARTS``) and its
    losses off."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    chosen = {part: part in parts for part in PARTS}

    def patch_model(model: Any) -> None:
        apply(**chosen, cross_entropy=False, fused_linear_cross_entropy=False, model=model)

    return patch_model


def patch(base: Any, parts: tuple[str, ...] = PARTS) -> tuple[Undo, int]:
    """Patch liger's kernels into ``base`` (a transformers ``*ForCausalLM``, the PEFT model's base). Returns a
    function that puts back the instance forwards and the modeling module's globals it replaced, and how many
    modules' forwards were replaced (for Llama: three a layer and the final norm)."""
    modeling = sys.modules[type(base).__module__]
    before_globals = dict(vars(modeling))
    before_bound = [(m, {k: m.__dict__[k] for k in _BOUND if k in m.__dict__}) for m in base.modules()]

    def undo() -> None:
        for name, value in before_globals.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
        for module, saved in before_bound:
            for key in _BOUND:
                if key in saved:
                    module.__dict__[key] = saved[key]
                else:
                    module.__dict__.pop(key, None)

    try:
        liger_apply(base.config.model_type, parts)(base)
    except BaseException:
        undo()
        raise
    changed = sum(1 for module, saved in before_bound if module.__dict__.get("forward") is not saved.get("forward"))
    return undo, changed


def check(plain: tuple[float, torch.Tensor], patched: tuple[float, torch.Tensor]) -> tuple[str | None, str]:
    """(why the patched model cannot stand in for the plain one, or None; the probe's figures for the log)
    from (loss, last hidden states) of one probe batch each."""
    (loss_a, hidden_a), (loss_b, hidden_b) = plain, patched
    diff = float((hidden_b.float() - hidden_a.float()).norm() / hidden_a.float().norm().clamp_min(1e-12))
    figures = f"probe loss {loss_b:.6f} against {loss_a:.6f}, hidden states {diff:.2e} apart (relative)"
    if not (math.isfinite(loss_b) and math.isclose(loss_a, loss_b, rel_tol=LOSS_RTOL)):
        return f"the loss with the kernels differs from the model's own: {figures}", figures
    if not diff <= HIDDEN_RTOL:
        return f"the hidden states with the kernels differ from the model's own: {figures}", figures
    return None, figures
