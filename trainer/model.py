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

``training_kernels`` (``--kernels``) patches liger-kernel's RMSNorm, RoPE and SwiGLU into the PEFT model's base
and keeps them only if a probe batch through ``forward_loss`` gives the unpatched model's loss (trainer/kernels.py).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..server.model import cache_kwarg, compute_dtype, load_causal_lm
from . import fused_loss, kernels
from .config import ConfigError, TrainConfig
from .fused_loss import LossHead


def load_tokenizer(base_dir: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"{base_dir}: the tokenizer has no EOS token; the loss needs one after each response")
    return tok


def load_base(cfg: TrainConfig, device: torch.device) -> Any:
    """The frozen base, loaded as the daemon loads it (``server.model.load_causal_lm``: the same quantization
    settings, device placement and compute dtype), with the model's own cache off: training never decodes."""
    model = load_causal_lm(cfg.base, cfg.quantization, device, compute_dtype(device))
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


def forward_loss(peft_model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                 head: LossHead | None = None) -> tuple[torch.Tensor, Any]:
    """Mean token loss of one micro-batch (labels -100 are ignored). Returns (loss, prefix cache or None).
    ``head`` (``fused_loss.make_head``): the decoder's hidden states go into it instead of the model's own
    logits and loss."""
    if cfg.method == "lora" and head is None:
        return peft_model(**batch).loss, None
    base = peft_model.get_base_model()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    cache = None
    if cfg.method == "ptuning-v2":
        v = cfg.num_virtual_tokens
        cache = prefix_cache(peft_model, ids.shape[0])
        kwargs = {"input_ids": ids, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0) + v, "use_cache": True,
                  "attention_mask": torch.cat([mask.new_ones(ids.shape[0], v), mask], dim=1),
                  cache_kwarg(base): cache}
    if head is None:
        return base(**kwargs, labels=batch["labels"]).loss, cache
    # the LoRA layers sit inside the base's modules, so the decoder alone runs them as PEFT's forward would
    hidden = base.get_decoder()(**kwargs).last_hidden_state
    return head(hidden, batch["labels"]), cache


def loss_head(peft_model: Any, cfg: TrainConfig, device: torch.device) -> tuple[LossHead | None, str]:
    """The fused loss head ``cfg.fused_loss`` asks for, checked against the model's own loss on a probe batch,
    and its name ("plain" when off, and with ``auto`` off CUDA). A head that does not match: ``ConfigError``
    naming ``fused_loss``. With ``auto``, a liger kernel that fails on the probe (Triton cannot compile here)
    gives way to the torch head."""
    if cfg.fused_loss == "off":
        return None, "plain"
    why = fused_loss.auto_off(device) if cfg.fused_loss == "auto" else None
    if why is not None:
        fused_loss.log.info("fused loss: off (auto: %s)", why)
        return None, "plain"
    base = peft_model.get_base_model()
    head, name = fused_loss.make_head(base, device, cfg.fused_loss)
    try:
        reason = _probe_head(peft_model, cfg, head, device)
    except Exception as exc:
        if cfg.fused_loss != "auto" or name != "liger":
            raise
        fused_loss.log.warning("liger-kernel failed on a probe batch (%s: %s): the torch fused loss instead",
                               type(exc).__name__, exc)
        head, name = fused_loss.make_head(base, device, "torch")
        reason = _probe_head(peft_model, cfg, head, device)
    if reason is not None:
        raise ConfigError("fused_loss", f"{reason}; train with --fused-loss off")
    return head, name


@contextlib.contextmanager
def _probing(peft_model: Any, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """A 16-token probe batch, with the model in eval mode (no dropout: every forward sees the same model)
    and without gradients; the model's mode is put back after."""
    ids = torch.arange(3, 19, device=device)[None] % peft_model.config.vocab_size
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    finally:
        peft_model.train(was_training)


def _probe_head(peft_model: Any, cfg: TrainConfig, head: LossHead, device: torch.device) -> str | None:
    """``fused_loss.check_head`` on the probe batch."""
    with _probing(peft_model, device) as probe:
        return fused_loss.check_head(peft_model.get_base_model(), forward_loss(peft_model, probe, cfg)[0],
                                     forward_loss(peft_model, probe, cfg, head)[0])


def training_kernels(peft_model: Any, cfg: TrainConfig, device: torch.device) -> str:
    """Patch the kernels ``cfg.kernels`` asks for into the PEFT model's base (trainer/kernels.py) and return
    what runs: "liger" or "off". ``liger`` where they cannot run (no CUDA, a model type not patched, no
    liger-kernel) or do not match the plain model on a probe batch: ``ConfigError`` naming ``kernels``, the
    model left as it was. ``auto``: off instead, with one log line saying why."""
    if cfg.kernels == "off":
        return "off"
    base = peft_model.get_base_model()
    reason = kernels.unavailable(base, device)
    if reason is not None:
        if cfg.kernels == "liger":
            raise ConfigError("kernels", f"liger: {reason}; train with --kernels off")
        kernels.log.info("kernels: off (auto: %s)", reason)
        return "off"
    plain = _probe_kernels(peft_model, cfg, device)
    undo, count = kernels.patch(base)
    try:
        reason, figures = kernels.check(plain, _probe_kernels(peft_model, cfg, device))
    except Exception as exc:
        undo()
        if cfg.kernels != "auto":
            raise
        kernels.log.warning("kernels: off (liger-kernel failed on a probe batch: %s: %s)", type(exc).__name__, exc)
        return "off"
    if reason is not None:
        undo()
        if cfg.kernels == "liger":
            raise ConfigError("kernels", f"liger: {reason}; train with --kernels off")
        kernels.log.warning("kernels: off (auto: %s)", reason)
        return "off"
    kernels.log.info("kernels: liger (RMSNorm, RoPE, SwiGLU; %d modules patched; %s)", count, figures)
    return "liger"


def _probe_kernels(peft_model: Any, cfg: TrainConfig, device: torch.device) -> tuple[float, torch.Tensor]:
    """(the model's own loss, the decoder's last hidden states) on the probe batch through ``forward_loss``
    (P-Tuning v2's prefix included)."""
    seen: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(hidden.detach().float())
        return hidden.new_zeros(())

    with _probing(peft_model, device) as probe:
        loss = float(forward_loss(peft_model, probe, cfg)[0])
        forward_loss(peft_model, probe, cfg, capture)
    return loss, seen[0]


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
