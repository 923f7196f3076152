"""Combine LoRA adapters into a new PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Works on the adapters' state dicts alone: no base weights are loaded. The base directory's ``config.json`` is
used only to learn the model's module order (a model built on the meta device, no memory), which fixes the
order of DARE's random draws so that a seed reproduces PEFT's result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..adapters.peft_format import LoraModule
from ..errors import FailedPrecondition
from .lora import LoraAdapter, key_prefix
from .strategies import CombineOptions, Strategy

# (modules_done, modules_total, bytes_written); may raise to cancel.
ProgressFn = Callable[[int, int, int], None]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def model_module_order(base_dir: Path) -> list[str] | None:
    """Module names of the base architecture in definition order (PEFT's iteration order), from a model
    built on the meta device (no weights, no memory); None if the architecture cannot be built."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return [name for name, _ in model.named_modules()]
    except Exception:  # unknown or remote-code architectures: fall back to natural order
        return None


def order_modules(names: set[str], base_order: list[str] | None) -> list[str]:
    """``names`` in model order where known, else in natural order (digits compared as numbers)."""
    rank = {n: i for i, n in enumerate(base_order or [])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), natural_key(n)))


def check_shapes(adapters: list[LoraAdapter]) -> None:
    """Adapters combined must agree on each shared module's in/out features (same base model)."""
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            shape = (int(module.b.shape[0]), int(module.a.shape[1]))
            first = seen.setdefault(name, (adapter.adapter_id, shape))
            if first[1] != shape:
                raise FailedPrecondition(
                    f"{name}: adapter {first[0]!r} is {first[1]} (out, in) but {adapter.adapter_id!r} is {shape}; "
                    "the adapters were made for different base models", field="adapters")


def union_targets(targets: list[list[str] | str | None]) -> list[str] | str:
    """PEFT's rule for the new ``target_modules``: the union of lists, or regexes joined with ``|``."""
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted({m for t in targets for m in t})
    raise FailedPrecondition("the adapters mix target_modules given as a list and as a regex string; PEFT "
                             "cannot combine them either", field="adapters")


def new_config(adapters: list[LoraAdapter], rank: int, patterns: dict[str, int]) -> dict[str, Any]:
    """The first adapter's config with PEFT's changes: ``r = lora_alpha = rank`` (scaling 1), the union of
    targets. ``use_rslora`` is turned off: with it PEFT's own result would be scaled by sqrt(rank), a bug.
    Modules whose rank differs from ``rank`` get ``rank_pattern``/``alpha_pattern`` entries (still scaling 1).
    """
    config = dict(adapters[0].config.raw)
    config.update(r=rank, lora_alpha=rank, use_rslora=False,
                  target_modules=union_targets([a.config.target_modules for a in adapters]),
                  rank_pattern=dict(patterns), alpha_pattern=dict(patterns))
    return config


def combine(adapters: list[tuple[LoraAdapter, float]], strategy: Strategy, opts: CombineOptions,
            requested_rank: int, base_order: list[str] | None,
            progress: ProgressFn | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The new adapter's config and state dict (PEFT key names)."""
    check_shapes([a for a, _ in adapters])
    rank = strategy.new_rank([a.peft_rank for a, _ in adapters], requested_rank)
    names = order_modules({n for a, _ in adapters for n in a.modules}, base_order)
    state: dict[str, torch.Tensor] = {}
    patterns: dict[str, int] = {}
    if progress is not None:
        progress(0, len(names), 0)
    for done, name in enumerate(names, 1):
        present: list[tuple[LoraModule, float]] = [(a.modules[name], w) for a, w in adapters if name in a.modules]
        lora_a, lora_b = strategy.combine(name, [m for m, _ in present], [w for _, w in present], rank, opts)
        prefix = key_prefix(name)
        state[f"{prefix}.lora_A.weight"] = lora_a.contiguous()
        state[f"{prefix}.lora_B.weight"] = lora_b.contiguous()
        if lora_a.shape[0] != rank:
            patterns[name] = int(lora_a.shape[0])
        if progress is not None:
            progress(done, len(names), 0)
    return new_config([a for a, _ in adapters], rank, patterns), state


def write_adapter(out_dir: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> int:
    """Write the adapter files into ``out_dir`` (the caller publishes it atomically); returns bytes.

    The weights are serialised in memory (an adapter is MBs) and written with ``open``: ``save_file`` writes
    through a temporary file of mode 0600, which would leave the adapter readable by its owner alone whatever
    the umask."""
    with open(out_dir / "adapter_model.safetensors", "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
