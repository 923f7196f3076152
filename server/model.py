"""Loading the base model (int8 / nf4 / none) and its tokenizer, once, for the daemon's lifetime."""

from __future__ import annotations

import inspect
import logging
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
    if requested:
        return torch.device(requested)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        # threshold 0 turns off LLM.int8's per-batch outlier columns: with the default 6.0, a row's output
        # depends on the other rows of its batch (stack notes), which would break per-request determinism.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype)
    return None


def load_base_model(path: str | Path, quantization: str = "int8", device: str | None = None,
                    dtype: str | None = None, max_sequence_length: int | None = None) -> BaseModel:
    """Load a Hugging Face causal LM directory for serving.

    ``dtype`` defaults to bfloat16 on a GPU and float32 on a CPU. ``max_sequence_length`` defaults to the
    model's ``max_position_embeddings``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    path = Path(path)
    attention = check_config(AutoConfig.from_pretrained(path))  # refuse before reading any weights
    dev = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    qconfig = _quantization_config(quantization, torch_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    log.info("loading base model %s (quantization=%s, dtype=%s, device=%s)", path, quantization,
             torch_dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qconfig is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = inspect.signature(model.forward).parameters
    max_len = max_sequence_length or getattr(model.config, "max_position_embeddings", None) or 2048
    return BaseModel(model=model, tokenizer=tokenizer, path=path, quantization=quantization, device=dev,
                     dtype=torch_dtype, max_sequence_length=int(max_len),
                     cache_kwarg="cache" if "cache" in params else "past_key_values", attention=attention)
