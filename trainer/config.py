"""The trainer's settings: one dataclass, its help text, its validation, and its command-line form.

Defaults follow the reference recipes (llama-recipes' PEFT LoRA on an 8-bit base; ChatGLM3 finetune_demo's
P-Tuning v2): batch 4, 3 epochs, context 1024, int8, learning rate 1e-4, LoRA r 8 / alpha 32 / q_proj+v_proj /
dropout 0.05, P-Tuning v2 = PEFT prefix tuning with 128 virtual tokens and no projection, a checkpoint every
500 steps, a 5% eval split. On CUDA the fused loss and liger-kernel's kernels are on where they import and
pass their probe (``auto``, measured on an H200: bench/RESULTS.md); on the CPU both are off. Every field
carries its help text in ``metadata["help"]`` so that the command line, the daemon's ``StartTraining``
options and the docs read from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..server.config import QUANTIZATIONS  # what the one base loader (server/model.py) supports

METHODS = ("lora", "ptuning-v2")
PROMPT_FORMATS = ("alpaca", "chat")
SCHEDULES = ("linear", "cosine", "constant")
INT8_COMPUTE = ("dequant", "bnb")
TOGGLE = ("auto", "on", "off")
FUSED_LOSS = ("off", "auto", "torch", "liger")
KERNELS = ("off", "auto", "liger")


class ConfigError(ValueError):
    """A setting that cannot work; ``field`` names it (as on the command line, with underscores)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def _f(default: Any, help_text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Everything one training run needs. Paths are strings so that the config round-trips through JSON."""

    base: str = _f("", "base model directory (transformers format, with its tokenizer)", cli_required=True)
    data: str = _f("", "training data: Alpaca JSON (a list of instruction/input/output) or JSON lines",
                   cli_required=True)
    method: str = _f("lora", "adapter kind: lora, or ptuning-v2 (PEFT prefix tuning)", choices=METHODS)
    output: str = _f("", "run directory: checkpoints, status.json, train.log, final adapter", cli_required=True)
    prompt_format: str = _f(
        "alpaca", "how each record becomes an example: alpaca (the Alpaca prompt) or chat (a conversation, user: "
        "instruction and input, assistant: output, rendered with the base tokenizer's own chat template)",
        choices=PROMPT_FORMATS)
    quantization: str = _f("int8", "how the frozen base is held: int8 (bitsandbytes LLM.int8), nf4 or none",
                           choices=QUANTIZATIONS)
    batch_size: int = _f(4, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum)")
    epochs: float = _f(3.0, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run; 0 means as many as the epochs need")
    context_length: int = _f(1024, "longest example in tokens; longer ones are cut at the end")
    learning_rate: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 turns clipping off")
    warmup_steps: int = _f(0, "optimizer steps of linear warm-up from 0 to the peak learning rate")
    schedule: str = _f("linear", "learning-rate decay after warm-up: linear (to 0), cosine (to 0) or constant",
                       choices=SCHEDULES)
    save_steps: int = _f(500, "write RUN_DIR/checkpoint-N every N optimizer steps (and at the end)")
    keep_last: int = _f(3, "checkpoints kept on disk (oldest removed first); 0 keeps all")
    eval_split: float = _f(0.05, "fraction of records held out for eval loss (0 turns eval off)")
    eval_steps: int = _f(0, "eval every N steps; 0 means at each checkpoint and at the end")
    seed: int = _f(42, "seed for the data order, the eval split, adapter init and dropout")
    log_every: int = _f(10, "write a line to train.log every N steps")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    lora_target_modules: str = _f("q_proj,v_proj", "comma-separated module names that get LoRA")
    num_virtual_tokens: int = _f(128, "P-Tuning v2: virtual tokens (prefix key/values per layer)")
    gradient_checkpointing: str = _f(
        "auto", "recompute layer activations in the backward pass: auto (on with a GPU), on, off",
        choices=TOGGLE)
    int8_compute: str = _f(
        "dequant", "int8 base matmuls while training: dequant (int8 weights widened to the compute dtype one "
        "layer at a time, then a plain matmul) or bnb (bitsandbytes' int8 matmul)", choices=INT8_COMPUTE)
    fused_loss: str = _f(
        "auto", "the LM head's cross-entropy without the full logits (trainer/fused_loss.py): auto (the default: "
        "on CUDA liger-kernel's fused kernel where it imports and the probe batch accepts it, else torch; on "
        "the CPU off, so CPU runs train exactly as before), off (the model's own loss), torch (chunked), liger "
        "(liger-kernel's Triton kernel; CUDA)", choices=FUSED_LOSS)
    kernels: str = _f(
        "auto", "training kernels in the base model (trainer/kernels.py): auto (the default: liger on CUDA where "
        "it imports and the probe batch accepts it, else off; off on the CPU), off (transformers' own), liger "
        "(liger-kernel's Triton RMSNorm, RoPE and SwiGLU, checked against the plain model on a probe batch; "
        "CUDA and Llama-family models only)", choices=KERNELS)
    skip_malformed: bool = _f(False, "skip malformed records (counted and reported) instead of failing")
    export_adapter: str = _f("", "copy the final adapter to this directory (atomically; must not exist)")
    resume: str = _f("", "resume from 'latest' or a checkpoint name/path (internal; set by --resume)",
                     cli=False)

    # ------------------------------------------------------------------ helpers

    @property
    def target_modules(self) -> list[str]:
        """``lora_target_modules`` as a list of names."""
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def run_dir(self) -> Path:
        return Path(self.output)

    def validate(self, *, check_paths: bool = True) -> TrainConfig:
        """Raise ``ConfigError`` naming the first field that cannot work; return ``self`` otherwise."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f.name, f"must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("base", "data", "output"):
            if not getattr(self, name):
                raise ConfigError(name, "is required")
        positive = ("batch_size", "grad_accum", "context_length", "save_steps", "log_every", "lora_r",
                    "num_virtual_tokens")
        for f in dataclasses.fields(self):  # NaN passes every comparison below, and inf passes most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"must be a finite number, not {value}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, not {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "keep_last", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be 0 or more, not {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("epochs", "must be positive when max_steps is 0")
        if not 0 < self.learning_rate < 1:
            raise ConfigError("learning_rate", f"must be in (0, 1), not {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.lora_alpha <= 0:
            bad = next(n for n in ("weight_decay", "max_grad_norm", "lora_alpha")
                       if getattr(self, n) < 0 or (n == "lora_alpha" and self.lora_alpha <= 0))
            raise ConfigError(bad, "out of range")
        if not 0 <= self.eval_split < 1:
            raise ConfigError("eval_split", f"must be in [0, 1), not {self.eval_split}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), not {self.lora_dropout}")
        if self.method == "lora" and not self.target_modules:
            raise ConfigError("lora_target_modules", "names no module")
        if self.method == "ptuning-v2" and self.num_virtual_tokens >= self.context_length:
            raise ConfigError("num_virtual_tokens", "must be smaller than context_length")
        if check_paths:
            if not Path(self.base).is_dir():
                raise ConfigError("base", f"no such directory: {self.base}")
            if not Path(self.data).is_file():
                raise ConfigError("data", f"no such file: {self.data}")
            if self.export_adapter and Path(self.export_adapter).exists() and not self.resume:
                raise ConfigError("export_adapter", f"already exists: {self.export_adapter}")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, ignoring unknown keys (configs written by newer versions still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# Settings that must not change between a run and its resume, or the loss curve would not continue.
RESUME_CRITICAL = ("method", "prompt_format", "quantization", "batch_size", "grad_accum", "context_length", "seed",
                   "eval_split", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "num_virtual_tokens", "schedule", "warmup_steps", "learning_rate", "int8_compute")


def cli_fields() -> list[dataclasses.Field]:
    """The fields that have a command-line option (``--batch-size`` for ``batch_size``)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def option_names() -> set[str]:
    """Names accepted as ``StartTrainingRequest.options`` keys (the daemon sets base/data/method/output)."""
    return {f.name for f in cli_fields()} - {"base", "data", "method", "output", "export_adapter"}


def parse_value(name: str, text: str) -> Any:
    """Convert one option's text (as in the daemon's options map) to the field's type; ValueError if not."""
    f = next((f for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    if f is None:
        raise ConfigError(name, "no such option")
    default = f.default
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(name, f"expected true or false, not {text!r}")
        return low in ("true", "1", "yes", "on")
    try:
        return type(default)(text)
    except ValueError as exc:
        raise ConfigError(name, f"expected {type(default).__name__}, not {text!r}") from exc


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field, with the field's help text and default."""
    for f in cli_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{help_text} (default: {f.default})"}
        if f.metadata.get("cli_required"):
            kwargs = {"dest": f.name, "help": help_text, "required": True}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, type=type(f.default), default=f.default, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    return TrainConfig(**values)
