"""Loading a base model (int8 / nf4 / none): the one loader of the daemon (with its tokenizer, once, for the
daemon's lifetime) and of the trainer (which adds only what training needs). Device choice, compute dtype,
bitsandbytes settings and the cache argument's name across transformers versions live here, once."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architecture import AttentionLayout, check_config
from .config import QUANTIZATIONS  # one list: the command line's choices too

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The served base: the transformers model, its tokenizer, and facts the engine needs about it."""

    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    path: Path
    quantization: str
    device: torch.device
    dtype: torch.dtype  # compute dtype of activations and adapter weights
    max_sequence_length: int
    cache_kwarg: str  # "cache" on transformers >= 5.24, "past_key_values" before
    attention: AttentionLayout  # sliding windows per layer type, which the engine's masks apply

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def pad_token_id(self) -> int:
        """The token that fills padding positions (never attended to): the tokenizer's, else 0."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def pick_device(requested: str | None = None) -> torch.device:
    """The device a base model is loaded on, for the daemon and the trainer alike.

    ``requested`` ("cpu", "cuda", "cuda:1") wins; without it, this process's GPU when CUDA is available,
    else the CPU. This process's GPU is ``cuda:LOCAL_RANK`` (torchrun sets LOCAL_RANK for each of its
    processes; 0 otherwise), and a bare "cuda" means it too: a CUDA device always carries its index, so that
    it compares equal to the devices of the tensors placed on it (``torch.device("cuda") != "cuda:0"``).
    """
    device = torch.device(requested) if requested else None
    if device is None or (device.type == "cuda" and device.index is None):
        if device is None and not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype activations and unquantized weights are computed in: bf16 on a GPU that has it (fp16 on one
    that does not, where bf16 would be emulated or refused); fp32 on the CPU, where bf16 matmuls are slow
    and tests compare against an fp32 oracle token for token."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantization: str, dtype: torch.dtype) -> Any:
    """The bitsandbytes settings of a quantized base (None for "none"), the same for serving, training and
    the tests' oracle, so that an adapter trained on an nf4 base is served on the very same weights.

    int8: threshold 0 turns off LLM.int8's per-batch outlier columns: with the default 6.0, a row's output
    depends on the other rows of its batch (stack notes), which would break per-request determinism. nf4: the
    QLoRA recipe (NF4 with double quantization of the block scales, about 0.4 bits a weight less), computing
    in ``dtype``. Modules left unquantized: transformers' default (the output head).
    """
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=True)
    return None


def load_causal_lm(path: str | Path, quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The frozen base (no parameter requires grad), quantized as asked, its unquantized weights in
    ``dtype``, placed on ``device``: a GPU's weights are loaded straight onto it, and a quantized base's
    bitsandbytes layers are placed by ``device_map`` (they cannot be moved after loading)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if device.type == "cuda" or qconfig is not None:
        kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.requires_grad_(False)
    return model


def cache_kwarg(model: Any) -> str:
    """The name of the forward's cache argument: ``cache`` on transformers >= 5.24, ``past_key_values``
    before (5.17 is the version the GPU image pins)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_base_model(path: str | Path, quantization: str = "int8", device: str | None = None,
                    dtype: str | None = None, max_sequence_length: int | None = None) -> BaseModel:
    """Load a Hugging Face causal LM directory for serving.

    ``device``: see ``pick_device``. ``dtype`` defaults to ``compute_dtype`` (bf16 on a GPU, fp32 on a CPU).
    ``max_sequence_length`` defaults to the model's ``max_position_embeddings``.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    attention = check_config(AutoConfig.from_pretrained(path))  # refuse before reading any weights
    dev = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else compute_dtype(dev)
    log.info("loading base model %s (quantization=%s, dtype=%s, device=%s)", path, quantization,
             torch_dtype, dev)
    model = load_causal_lm(path, quantization, dev, torch_dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_len = max_sequence_length or getattr(model.config, "max_position_embeddings", None) or 2048
    return BaseModel(model=model, tokenizer=tokenizer, path=path, quantization=quantization, device=dev,
                     dtype=torch_dtype, max_sequence_length=int(max_len), cache_kwarg=cache_kwarg(model),
                     attention=attention)
