"""A LoRA adapter as the merger sees it: its typed config and, per target module, the A/B factors and scaling.

Everything about the format (which files, which keys, PEFT's defaults, shapes, ranks, finiteness, scaling)
is ``adapters.peft_format``, the reader serving uses too, so an adapter that serves also merges. Here: the
merger's own policy (only LoRA adapters have a weight delta to merge) and errors that name the adapter and
the request field. Module names are PEFT's (``model.layers.0.self_attn.q_proj``), the names it matches
``rank_pattern`` / ``alpha_pattern`` against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.peft_format import (
    LORA,
    PEFT_PREFIX,
    LoraConfig,
    LoraModule,
    lora_modules,
    peft_type,
    read_adapter,
    read_adapter_config,
)
from ..errors import AdapterdError, FailedPrecondition

# Adapters that add virtual tokens (keys/values or embeddings) at run time: there is no weight delta.
PROMPT_LEARNING_TYPES = {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}


@dataclass
class LoraAdapter:
    """One loaded LoRA adapter: its config (``config.raw`` is kept to write merged configs) and its modules
    in name order."""

    adapter_id: str
    path: Path
    config: LoraConfig
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def peft_rank(self) -> int:
        return self.config.peft_rank


def key_prefix(module: str) -> str:
    """The saved key of a module's factors, as PEFT writes it: ``base_model.model.<module>``."""
    return f"{PEFT_PREFIX}{module}"


@contextmanager
def _named(adapter_id: str, field_name: str) -> Iterator[None]:
    """Re-raise the reader's errors (which name the file or the config key) with the adapter and the request
    field, unless they name a field already."""
    try:
        yield
    except AdapterdError as exc:
        if exc.field is not None:
            raise
        raise type(exc)(f"adapter {adapter_id!r}: {exc.message}", field=field_name) from None


def check_mergeable(kind: str, adapter_id: str, field_name: str, purpose: str) -> None:
    """Refuse (FailedPrecondition) adapter types whose effect is not a low-rank delta on linear weights.

    ``purpose`` completes the sentence "cannot be ...", e.g. "folded into the base weights".
    """
    kind = kind.upper()
    if kind in PROMPT_LEARNING_TYPES:
        raise FailedPrecondition(
            f"adapter {adapter_id!r} is a {kind} (P-Tuning v2 / prefix) adapter: it adds trained "
            f"key/values for virtual tokens at run time and has no weight delta, so it cannot be {purpose}; "
            "serve it as an adapter instead", field=field_name)
    if kind != LORA:
        raise FailedPrecondition(f"adapter {adapter_id!r} is a {kind or 'unknown'} adapter; only LoRA "
                                 f"adapters can be {purpose}", field=field_name)


def load_lora_adapter(path: Path, adapter_id: str, field_name: str, purpose: str, *, root: Path | None = None,
                      max_bytes: int | None = None) -> LoraAdapter:
    """Read and check one adapter directory (already resolved by ``resolve_adapter_dir``). Its files must lie
    inside ``root`` (default: the adapter's own directory); ``max_bytes`` caps its tensor data."""
    root = path if root is None else root
    with _named(adapter_id, field_name):
        check_mergeable(peft_type(read_adapter_config(root, path)), adapter_id, field_name, purpose)
        files = read_adapter(root, path, max_bytes=max_bytes)
        config = LoraConfig.from_dict(files.raw)
        modules = lora_modules(config, files.tensors)
        config.peft_rank  # noqa: B018 - every rank_pattern entry is checked now, not midway through a merge
    return LoraAdapter(adapter_id, path, config, modules)
