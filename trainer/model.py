"""The model side of training: the frozen base (int8 / nf4 / none), the PEFT adapter, and the forward pass.

Two departures from the usual recipe, both about what an 8-bit base costs:

* No ``prepare_model_for_kbit_training``. It casts every non-int8 weight (embeddings, norms, lm_head) to
  fp32, which doubles their memory and turns the activations fp32 too; on the GPU machine it made 7B int8
  LoRA training 3.4x slower and raised peak memory from 47 to 78 GiB (shared/reference/gpu-baseline.md).
  Here the non-quantized weights stay in the compute dtype (bf16 on a GPU, fp32 on the CPU), the adapter's
  own weights are fp32 (PEFT's default), and gradient checkpointing runs non-reentrant, which needs no
  ``enable_input_require_grads``.
* ``int8_compute="dequant"``: bitsandbytes keeps each int8 weight row with one absmax scale (``CB``, ``SCB``).
  Its own matmul also quantizes the activations and is 3 to 5 times slower than bf16 on the H200. For
  training, each int8 weight is instead widened to the compute dtype one layer at a time, just before its
  matmul, and dropped after it; the backward pass widens it again. The weights stay int8 in memory (one
  layer's bf16 copy is transient) and the matmuls run at the compute dtype's speed. Activations are not
  quantized, so training is at least as exact as the bnb path. ``int8_compute="bnb"`` keeps bitsandbytes' own.

P-Tuning v2 (PEFT prefix tuning) runs through our own forward (``forward_loss``): PEFT passes the prefix as
``past_key_values``, which transformers 5.24 renamed ``cache`` (its ``generate`` then silently drops the
prefix), and PEFT refuses gradient checkpointing with prefix tuning because the cache is written during the
forward and would be written again on the recompute. Our cache layers return ``prefix ++ new`` without
storing anything, so the recompute sees exactly what the forward saw, and checkpointing is safe; each layer
counts its reads, and ``check_prefix_reaches_layers`` fails loudly if a transformers version drops the cache.
"""

from __future__ import annotations

import inspect
import os
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig


def pick_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is there (torchrun sets LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it (fp16 otherwise); fp32 on the CPU, where bf16 matmuls are slow and the
    resume test wants bit-exact arithmetic."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(base_dir: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"{base_dir}: the tokenizer has no EOS token; the loss needs one after each response")
    return tok


def load_base(cfg: TrainConfig, device: torch.device) -> Any:
    """The frozen base in the compute dtype, quantized as asked. ``llm_int8_threshold=0``: no outlier
    columns, so a row's result never depends on the other rows of its batch (see stack notes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    elif cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(cfg.base, **kwargs)
    if device.type != "cuda" and cfg.quantization == "none":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


# ------------------------------------------------------------------------------------- int8 dequant


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W = CB * scale made on the fly (one fused int8 x float kernel). Saves only
    references to the int8 weight and its row scales (already in memory), never a widened copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(cb, scale)
        return F.linear(x, cb * scale, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cb, scale = ctx.saved_tensors
        return grad @ (cb * scale.to(grad.dtype)), None, None, None


def _dequant_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Forward of a patched ``Linear8bitLt``. The row scales (SCB / 127, shape [out, 1], in the input's
    dtype) are computed once per module and dtype and kept beside the weight (a few KB)."""
    scale = self.__dict__.get("_adapterd_scale")
    if scale is None or scale.dtype != x.dtype or scale.device != x.device:
        scb = getattr(self.weight, "SCB", None)
        if scb is None:
            scb = self.state.SCB
        scale = (scb.float() / 127.0).to(device=x.device, dtype=x.dtype).unsqueeze(1)
        self.__dict__["_adapterd_scale"] = scale
    return _DequantLinear.apply(x, self.weight.data, scale, self.bias)


def use_dequant_int8(model: torch.nn.Module) -> int:
    """Route every bitsandbytes ``Linear8bitLt`` of the model through ``_DequantLinear``; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8:
            module.forward = types.MethodType(_dequant_forward, module)
            count += 1
    return count


# ------------------------------------------------------------------------------------------- adapters


def make_peft_model(base: Any, cfg: TrainConfig) -> Any:
    """Wrap the base in a fresh LoRA or prefix-tuning adapter (seeded: init depends on ``cfg.seed``)."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=False,
                                    task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    # PEFT keeps the adapter's weights in fp32 on a bf16 base (autocast_adapter_dtype); make sure of it.
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def enable_checkpointing(peft_model: Any, cfg: TrainConfig) -> None:
    """Non-reentrant gradient checkpointing on the base's decoder layers. For prefix tuning the layers may
    keep the cache under checkpointing, since our prefix cache is never written (see the module docstring)."""
    base = peft_model.get_base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "ptuning-v2":
        for module in base.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_can_checkpoint_with_cache"):
                module._can_checkpoint_with_cache = True


def checkpointing_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and device.type == "cuda")


# ------------------------------------------------------------------------------------------ forward


def cache_kwarg(model: Any) -> str:
    """transformers 5.24 calls the cache argument ``cache``; 5.17 ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _frozen_update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's ``update`` that returns prefix ++ new states and stores nothing."""
    self.prefix_reads = getattr(self, "prefix_reads", 0) + 1
    return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_cache(peft_model: Any, batch_size: int) -> Any:
    """PEFT's own prefix key/values (``get_prompt``, so the layout is exactly what PEFT saves and loads) in a
    cache whose layers never grow."""
    cache = peft_model.get_prompt(batch_size=batch_size)
    for layer in cache.layers:
        layer.update = types.MethodType(_frozen_update, layer)
        layer.prefix_reads = 0
    return cache


def forward_loss(peft_model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> tuple[torch.Tensor, Any]:
    """Mean token loss of one micro-batch (labels -100 are ignored). Returns (loss, prefix cache or None)."""
    if cfg.method == "lora":
        return peft_model(**batch).loss, None
    base = peft_model.get_base_model()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    v = cfg.num_virtual_tokens
    cache = prefix_cache(peft_model, ids.shape[0])
    full_mask = torch.cat([torch.ones(ids.shape[0], v, dtype=mask.dtype, device=mask.device), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + v
    out = base(input_ids=ids, attention_mask=full_mask, position_ids=positions, labels=batch["labels"],
               use_cache=True, **{cache_kwarg(base): cache})
    return out.loss, cache


def check_prefix_reaches_layers(peft_model: Any, cfg: TrainConfig, device: torch.device) -> bool:
    """Run one tiny training-mode forward+backward and report whether every decoder layer read the prefix.
    False means this transformers version dropped the cache (e.g. under gradient checkpointing)."""
    ids = torch.tensor([[peft_model.config.bos_token_id or 1] * 2], device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peft_model.train()
    loss, cache = forward_loss(peft_model, batch, cfg)
    loss.backward()
    peft_model.zero_grad(set_to_none=True)
    return all(getattr(layer, "prefix_reads", 0) > 0 for layer in cache.layers)
