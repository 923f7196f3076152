"""The daemon's settings: one typed dataclass, the single source of ``adapterd serve``'s command line.

Each field's type hint (int, float, str, Path, bool, ``X | None``, ``Literal[...]``) gives its flag's type and
choices, ``metadata["help"]`` its help text, its default the default that ``--help`` shows, and
``metadata["check"]`` the rule its value must follow (run by the CLI while parsing and again here, so that a
config built in Python is held to the same rules). Errors name the flag (``--max-batch-size``), since that is
what an operator typed. This module imports no torch: ``adapterd serve --help`` must stay fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Quantization = Literal["int8", "nf4", "none"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
Dtype = Literal["float32", "bfloat16", "float16"]
Check = Callable[[Any], "str | None"]  # a value -> None when it is fine, else what is wrong with it


class ConfigError(ValueError):
    """A setting that cannot work; ``flag`` names it as the command line does (``--max-batch-size``)."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        self.flag = flag_of(field_name)
        self.message = message
        super().__init__(f"{self.flag}: {message}")


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}, not {v}"


def between(low: float, high: float, *, low_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        inside = (low < v if low_open else low <= v) and v <= high
        return None if inside else f"must be in {'(' if low_open else '['}{low}, {high}], not {v}"
    return check


def _f(default: Any, help_text: str, check: Check | None = None, metavar: str | None = None) -> Any:
    """A field with its help text and, optionally, the rule its value must follow and the placeholder
    ``--help`` shows for its value."""
    return field(default=default, metadata={"help": help_text, "check": check, "metavar": metavar})


_PORT = between(0, 65535)


def _device_list(value: str) -> str | None:
    """``--device``: one torch device, or several separated by commas (one engine core each)."""
    entries = [entry.strip() for entry in value.split(",")]
    if not all(entries):
        return f"an empty entry in {value!r}: name one device per comma-separated entry (cuda:0,cuda:1)"
    return None


@dataclass
class ServerConfig:
    base: Path = field(metadata={"help": "Hugging Face causal LM directory (the base model)", "metavar": "DIR"})
    adapters: Path = field(metadata={"help": "adapter root: PEFT adapter directories, id = path under it",
                                     "metavar": "DIR"})
    quantization: Quantization = _f("int8", "how the base is held: int8 (bitsandbytes LLM.int8), nf4, or none "
                                            "(bf16 on a GPU, fp32 on a CPU)")
    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(50051, "gRPC port (0 picks a free one, printed at start-up)", _PORT)
    device: str | None = _f(None, "torch device, e.g. cpu or cuda:1 (default: cuda:0 if present, else cpu); a "
                                  "comma-separated list (cuda:0,cuda:1) runs one engine core per entry, each with "
                                  "the whole base, behind the one port, requests routed by adapter id",
                            _device_list, metavar="DEVICE[,DEVICE...]")
    dtype: Dtype | None = _f(None, "compute dtype (default: bfloat16 on a GPU, float16 on one without bfloat16, "
                                   "float32 on a CPU)")
    max_batch_size: int = _f(32, "rows decoded together", at_least(1))
    max_queue: int = _f(256, "waiting requests before RESOURCE_EXHAUSTED", at_least(1))
    lora_slots: int = _f(16, "LoRA adapters resident on the device at once", at_least(1))
    max_lora_rank: int = _f(64, "largest LoRA rank accepted", at_least(1))
    cuda_graphs: bool = _f(True, "replay decode steps from CUDA graphs on a GPU (off: eager steps, for debugging)")
    int8_kernel: bool = _f(True, "int8 base on a GPU: weight-only Triton matmul over the same int8 weights "
                                 "(off: bitsandbytes' own matmul)")
    fused_kernels: bool = _f(True, "on a GPU: one Triton kernel per RMSNorm, one for a decode step's rotary "
                                   "embedding and key/value append per layer, and BGMV kernels for LoRA in "
                                   "decode steps (off: transformers' and torch's own ops)")
    own_decoder: bool = _f(True, "Llama, Mistral, Qwen2, Qwen3 and GLM bases run the engine's own decoder forward "
                                 "(off: transformers' forward, as other families always do)")
    engine_process: bool = _f(True, "run the engine (model, adapters, key/value pool) in its own process, which "
                                    "the daemon restarts if it dies; off: in the gRPC process, sharing its GIL "
                                    "(for debugging)")
    frontends: int = _f(0, "gRPC front-end processes sharing the port, all feeding the one engine core (0: one per "
                           "four cores, 1 to 8; needs --engine-process)", between(0, 64))
    gil_switch_interval_ms: float = _f(
        0.2, "longest a busy Python thread holds the GIL while another waits for it, ms (sys.setswitchinterval), "
             "in every process of the daemon: the engine core's I/O thread, or with --no-engine-process the gRPC "
             "event loop, beside the engine thread; Python's 5 ms default stalls them, since every torch call "
             "releases and retakes the GIL", between(0, 1000, low_open=True))
    adapter_cache_mb: int = _f(8192, "memory for loaded adapters, MiB; the least recently used beyond it are "
                                     "unloaded", at_least(1))
    max_input_tokens: int | None = _f(None, "longest prompt, in tokens (default: the model's context)", at_least(1))
    max_new_tokens: int = _f(1024, "largest max_new_tokens a request may ask", at_least(1))
    default_max_new_tokens: int = _f(64, "max_new_tokens when a request sets 0", at_least(1))
    max_message_bytes: int = _f(4 * 1024 * 1024, "largest gRPC message, bytes", at_least(1))
    runs: Path | None = _f(None, "training runs root (StartTraining, TrainStatus); training RPCs are off if unset",
                           metavar="DIR")
    merge_output_root: Path | None = _f(None, "where MergeAdapter may write model directories (anywhere if unset)",
                                        metavar="DIR")
    metrics_port: int | None = _f(None, "Prometheus /metrics port (off if unset)", _PORT)
    http_port: int | None = _f(None, "OpenAI-compatible HTTP API port (/v1/chat/completions, /v1/completions, "
                                     "/v1/models) on --host, beside gRPC (off if unset; 0 picks a free one)", _PORT)
    max_concurrent_rpcs: int | None = _f(None, "adapterd.v1 RPCs in progress at once before RESOURCE_EXHAUSTED, "
                                               "counted after authentication (unlimited if unset)", at_least(1))
    max_open_rpcs: int = _f(32, "health and reflection RPCs (which need no token) in progress at once: their own "
                                "budget, so that they can never use up --max-concurrent-rpcs", at_least(1))
    tokens_file: Path | None = _f(None, "bearer tokens, lines role:token (roles user, admin) or JSON; no "
                                        "authentication if unset", metavar="FILE")
    tls_cert: Path | None = _f(None, "server certificate chain (PEM); turns on TLS, with --tls-key",
                                 metavar="FILE")
    tls_key: Path | None = _f(None, "server private key (PEM, unencrypted)", metavar="FILE")
    tls_client_ca: Path | None = _f(None, "CA bundle (PEM): require and verify client certificates (mutual TLS)",
                                     metavar="FILE")

    def __post_init__(self) -> None:
        self.base, self.adapters = Path(self.base), Path(self.adapters)
        for name in ("runs", "merge_output_root", "tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for f in fields(self):
            message = check_value(f.name, getattr(self, f.name))
            if message is not None:
                raise ConfigError(f.name, message)
        self._check_together()
        if not self.adapters.is_dir():
            raise ConfigError("adapters", f"{self.adapters} is not a directory")

    def _check_together(self) -> None:
        """The rules between fields."""
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(missing, "is missing: --tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca", "mutual TLS needs --tls-cert and --tls-key too")
        if self.device is not None and "," in self.device and not self.engine_process:
            raise ConfigError("device", "several devices need --engine-process (one engine core per device)")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ConfigError("default_max_new_tokens", f"{self.default_max_new_tokens} exceeds --max-new-tokens "
                                                        f"{self.max_new_tokens}")


@dataclass(frozen=True)
class Kind:
    """What a field's type hint says its values are: ``type`` (int, float, str, Path, bool), the allowed
    values of a ``Literal`` (else empty), and whether None (unset) is allowed."""

    type: type
    choices: tuple[Any, ...]
    optional: bool


@functools.cache
def kind_of(name: str) -> Kind:
    hint = get_type_hints(ServerConfig)[name]
    optional = get_origin(hint) in (Union, UnionType) and NoneType in get_args(hint)
    if optional:
        (hint,) = [a for a in get_args(hint) if a is not NoneType]
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return Kind(type(choices[0]), choices, optional)
    if hint not in (int, float, str, Path, bool):  # a flag's text could not become it
        raise TypeError(f"ServerConfig.{name}: the command line has no flag type for {hint!r}")
    return Kind(hint, (), optional)


def check_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name`` (None when fine; None is fine for an optional field)."""
    if value is None:
        return None if kind_of(name).optional else "must be set"
    choices = kind_of(name).choices
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, not {value!r}"
    check = next(f.metadata.get("check") for f in fields(ServerConfig) if f.name == name)
    return check(value) if check is not None else None
