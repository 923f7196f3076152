"""The daemon's settings: one dataclass, with the help text the CLI shows and validation."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from adapterd.server.model import QUANTIZATIONS


@dataclass
class ServerConfig:
    base: Path = field(metadata={"help": "Hugging Face causal LM directory (the base model)"})
    adapters: Path = field(metadata={"help": "adapter root: PEFT adapter directories, id = path under it"})
    quantization: str = field(default="int8", metadata={"help": "int8 (bitsandbytes LLM.int8), nf4, or none"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda:0 if present)"})
    dtype: str | None = field(default=None, metadata={"help": "compute dtype (default bfloat16 on GPU, float32 "
                                                              "on CPU)"})
    max_batch_size: int = field(default=32, metadata={"help": "rows decoded together"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests before RESOURCE_EXHAUSTED"})
    lora_slots: int = field(default=16, metadata={"help": "LoRA adapters resident on the device at once"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest LoRA rank accepted"})
    cuda_graphs: bool = field(default=True, metadata={"help": "replay decode steps from CUDA graphs on a GPU "
                                                               "(off: eager steps, for debugging)"})
    int8_kernel: bool = field(default=True, metadata={"help": "int8 base on a GPU: weight-only Triton matmul "
                                                               "over the same int8 weights (off: bitsandbytes' "
                                                               "own matmul)"})
    fused_kernels: bool = field(default=True, metadata={"help": "on a GPU: one Triton kernel per RMSNorm and "
                                                                 "BGMV kernels for LoRA in decode steps (off: "
                                                                 "transformers' and torch's own ops)"})
    gil_switch_interval_ms: float = field(default=0.2, metadata={
        "help": "longest a busy Python thread (the gRPC event loop) holds the GIL while the engine thread waits "
                "for it, ms (sys.setswitchinterval; Python's 5 ms default stalls each engine step behind the "
                "loop, since every torch call releases and retakes the GIL)"})
    adapter_cache_mb: int = field(default=8192, metadata={"help": "memory for loaded adapters, MiB; the least "
                                                                   "recently used beyond it are unloaded"})
    max_input_tokens: int | None = field(default=None, metadata={"help": "longest prompt, in tokens (default: "
                                                                           "the model's context)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "largest max_new_tokens a request may ask"})
    default_max_new_tokens: int = field(default=64, metadata={"help": "max_new_tokens when a request sets 0"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest gRPC message"})
    runs: Path | None = field(default=None, metadata={"help": "training runs root (StartTraining, TrainStatus)"})
    merge_output_root: Path | None = field(default=None, metadata={"help": "where MergeAdapter may write "
                                                                            "model directories"})
    metrics_port: int | None = field(default=None, metadata={"help": "Prometheus /metrics port (off if unset)"})
    max_concurrent_rpcs: int | None = field(default=None, metadata={"help": "adapterd.v1 RPCs in progress at once "
                                                                            "before RESOURCE_EXHAUSTED, counted after "
                                                                            "authentication (unlimited if unset)"})
    max_open_rpcs: int = field(default=32, metadata={"help": "health and reflection RPCs (which need no token) in "
                                                             "progress at once: their own budget, so that they can "
                                                             "never use up --max-concurrent-rpcs"})
    tokens_file: Path | None = field(default=None, metadata={"help": "bearer tokens, lines role:token (roles user, "
                                                                      "admin) or JSON; no auth if unset"})
    tls_cert: Path | None = field(default=None, metadata={"help": "server certificate chain (PEM); turns on TLS"})
    tls_key: Path | None = field(default=None, metadata={"help": "server private key (PEM)"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "CA bundle (PEM): require and verify "
                                                                        "client certificates (mutual TLS)"})

    def __post_init__(self) -> None:
        self.base, self.adapters = Path(self.base), Path(self.adapters)
        self.runs = Path(self.runs) if self.runs is not None else None
        if self.merge_output_root is not None:
            self.merge_output_root = Path(self.merge_output_root)
        for name in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs must be at least 1")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        for name in ("max_batch_size", "max_queue", "lora_slots", "max_lora_rank", "adapter_cache_mb", "max_new_tokens",
                     "default_max_new_tokens", "max_message_bytes", "max_open_rpcs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.gil_switch_interval_ms <= 1000:
            raise ValueError("gil_switch_interval_ms must be in (0, 1000]")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        if not self.adapters.is_dir():
            raise ValueError(f"adapter root {self.adapters} is not a directory")

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
