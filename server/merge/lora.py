"""A LoRA adapter as the merger sees it: its config and, per target module, the A/B factors and scaling.

Adapters are read from the files PEFT's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``, or a legacy ``adapter_model.bin``), without a model. Saved keys look like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; the module name is the part between
``base_model.model.`` and ``.lora_A.weight`` (``model.layers.0.self_attn.q_proj``), which is also the name
PEFT matches ``rank_pattern`` / ``alpha_pattern`` against. Anything PEFT can hold that is not a plain LoRA
on a linear layer (prompt learning, DoRA, embeddings, biases, modules_to_save) is refused with a reason.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.files import CONFIG_FILE, WEIGHTS_FILE, adapter_file, read_config, read_weights
from ..adapters.patterns import pattern_value
from ..errors import AdapterdError, DataLoss, FailedPrecondition
from ..safetensors_io import open_regular

PEFT_PREFIX = "base_model.model."
BIN_FILE = "adapter_model.bin"
LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])\.weight$")
# Adapters that add virtual tokens (keys/values or embeddings) at run time: there is no weight delta.
PROMPT_LEARNING_TYPES = {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}


@dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one linear module. ``delta()`` is the change to its weight, shape (out, in)."""

    name: str  # module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    key_prefix: str  # prefix of the saved keys, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    lora_a: torch.Tensor  # (r, in_features)
    lora_b: torch.Tensor  # (out_features, r)
    scaling: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    fan_in_fan_out: bool  # GPT-2 style Conv1D weights are stored (in, out)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this delta is added to."""
        out_f, in_f = int(self.lora_b.shape[0]), int(self.lora_a.shape[1])
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (transposed for fan_in_fan_out), as PEFT's ``get_delta_weight``."""
        d = torch.mm(self.lora_b.float(), self.lora_a.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d

    def add_to(self, rows: torch.Tensor, factor: float, first_row: int = 0) -> None:
        """``rows += factor * delta()[first_row : first_row + len(rows)]`` in place.

        Fused (``addmm_``), so no (out, in) temporary is made; ``rows`` is a block of the base weight as
        stored (fp32 or fp64; the factors are cast to its dtype). Stored rows are output features, or input
        features for fan_in_fan_out, whose delta is ``(B @ A).T = A.T @ B.T``.
        """
        a, b = self.lora_a.to(rows.dtype), self.lora_b.to(rows.dtype)
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)
        rows.addmm_(left[first_row: first_row + rows.shape[0]], right, alpha=factor * self.scaling)


@dataclass
class LoraAdapter:
    """One loaded LoRA adapter: raw config (kept to write merged configs) and modules in key order."""

    adapter_id: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def peft_rank(self) -> int:
        """The rank PEFT's ``add_weighted_adapter`` checks: ``r``, or the largest in ``rank_pattern``."""
        pattern = self.config.get("rank_pattern") or {}
        return max([int(self.config["r"]), *map(int, pattern.values())])


def read_adapter_config(root: Path, path: Path, adapter_id: str, field_name: str) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, read with the serving store's bounds (``adapters.files``)."""
    with _named(adapter_id, field_name):
        return read_config(adapter_file(root, path, CONFIG_FILE))


@contextmanager
def _named(adapter_id: str, field_name: str, only_unnamed: bool = False) -> Iterator[None]:
    """Re-raise the readers' errors (which name the file or the config key) with the adapter and the request
    field; with ``only_unnamed``, only those that do not name a field already."""
    try:
        yield
    except AdapterdError as exc:
        if only_unnamed and exc.field is not None:
            raise
        raise type(exc)(f"adapter {adapter_id!r}: {exc.message}", field=field_name) from None


def check_mergeable(config: dict[str, Any], adapter_id: str, field_name: str, purpose: str) -> None:
    """Refuse (FailedPrecondition) adapters whose effect is not a low-rank delta on linear weights.

    ``purpose`` completes the sentence "cannot be ...", e.g. "folded into the base weights".
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in PROMPT_LEARNING_TYPES:
        raise FailedPrecondition(
            f"adapter {adapter_id!r} is a {peft_type} (P-Tuning v2 / prefix) adapter: it adds trained "
            f"key/values for virtual tokens at run time and has no weight delta, so it cannot be {purpose}; "
            "serve it as an adapter instead", field=field_name)
    if peft_type != "LORA":
        raise FailedPrecondition(f"adapter {adapter_id!r} is a {peft_type or 'unknown'} adapter; only LoRA "
                                 f"adapters can be {purpose}", field=field_name)
    if config.get("use_dora"):
        raise FailedPrecondition(f"adapter {adapter_id!r} uses DoRA, which the merger does not support",
                                 field=field_name)
    if config.get("target_parameters"):
        raise FailedPrecondition(f"adapter {adapter_id!r} targets nn.Parameter (target_parameters), which "
                                 "the merger does not support", field=field_name)


def _load_state_dict(root: Path, path: Path, adapter_id: str, field_name: str,
                     max_bytes: int | None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (small: megabytes), from safetensors checked from its header before reading
    (``read_tensors``), or a legacy pickle loaded weights-only, each file confined to ``root``."""
    with _named(adapter_id, field_name):
        if os.path.lexists(path / WEIGHTS_FILE):
            return read_weights(root, path, max_bytes=max_bytes)
        if os.path.lexists(path / BIN_FILE):
            return _load_bin(adapter_file(root, path, BIN_FILE), max_bytes)
    raise DataLoss(f"adapter {adapter_id!r}: no {WEIGHTS_FILE} or {BIN_FILE}", field=field_name)


def _load_bin(path: Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    """A legacy pickle, loaded weights-only (no code runs), from a regular file within ``max_bytes``."""
    try:
        fd = open_regular(path, BIN_FILE)
    except OSError as exc:
        raise DataLoss(f"{BIN_FILE} is unreadable ({exc.strerror})") from None
    try:
        if max_bytes is not None and os.fstat(fd).st_size > max_bytes:
            raise FailedPrecondition(f"{BIN_FILE} is larger than the {max_bytes} bytes allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except AdapterdError:
        raise
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types for damaged files
        raise DataLoss(f"{BIN_FILE} is corrupt ({type(exc).__name__})") from None
    finally:
        os.close(fd)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise DataLoss(f"{BIN_FILE} does not hold a state dict of tensors")
    return state


def _alpha_for(config: dict[str, Any], module: str) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry matching ``module`` by PEFT's own rule (linear time)."""
    return float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"], "alpha_pattern"))


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's ``LoraLayer.update_layer``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = _alpha_for(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pair_keys(state: dict[str, torch.Tensor], adapter_id: str, field_name: str) -> dict[str, list[str]]:
    """Key prefix -> [A key, B key]; FailedPrecondition for tensors that are not LoRA A/B weights."""
    pairs: dict[str, list[str]] = {}
    for key in state:
        m = LORA_KEY.match(key)
        if not m:
            raise FailedPrecondition(f"adapter {adapter_id!r} holds {key!r}: only LoRA A/B weights of linear "
                                     "layers can be merged (no embeddings, biases or modules_to_save)",
                                     field=field_name)
        pairs.setdefault(m["prefix"], ["", ""])["AB".index(m["which"])] = key
    return pairs


def load_lora_adapter(path: Path, adapter_id: str, field_name: str, purpose: str, *, root: Path | None = None,
                      max_bytes: int | None = None) -> LoraAdapter:
    """Read and check one adapter directory (already resolved by ``resolve_adapter_dir``). Its files must lie
    inside ``root`` (default: the adapter's own directory); ``max_bytes`` caps its tensor data."""
    root = path if root is None else root
    config = read_adapter_config(root, path, adapter_id, field_name)
    check_mergeable(config, adapter_id, field_name, purpose)
    state = _load_state_dict(root, path, adapter_id, field_name, max_bytes)
    adapter = LoraAdapter(adapter_id, path, config)
    try:
        with _named(adapter_id, field_name, only_unnamed=True):
            _add_modules(adapter, state, field_name)
        adapter.peft_rank  # noqa: B018 - r and rank_pattern are read here, so that damage is found now
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as exc:
        raise DataLoss(f"adapter {adapter_id!r}: adapter_config.json does not make a valid LoRA config "
                       f"({type(exc).__name__}: {str(exc)[:120]})", field=field_name) from None
    if not adapter.modules:
        raise DataLoss(f"adapter {adapter_id!r} holds no LoRA weights", field=field_name)
    return adapter


def _add_modules(adapter: LoraAdapter, state: dict[str, torch.Tensor], field_name: str) -> None:
    """Pair each module's A and B, refusing damaged shapes and a scaling that is not a finite number (the
    tensors' values are checked where adapters are served; checking them here would cost the merge process
    memory that tests/server/merge/test_memory.py bounds)."""
    adapter_id, config = adapter.adapter_id, adapter.config
    for prefix, (key_a, key_b) in _pair_keys(state, adapter_id, field_name).items():
        if not key_a or not key_b:
            raise DataLoss(f"adapter {adapter_id!r}: {prefix} has only one of lora_A/lora_B", field=field_name)
        a, b = state[key_a], state[key_b]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise DataLoss(f"adapter {adapter_id!r}: {prefix} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                           "not (r, in) and (out, r)", field=field_name)
        name = prefix.removeprefix(PEFT_PREFIX)
        scaling = _scaling(config, name, int(a.shape[0]))
        if not math.isfinite(scaling):
            raise FailedPrecondition(f"adapter {adapter_id!r}: the scaling of {name!r} (lora_alpha / r) is not a "
                                     "finite number", field=field_name)
        adapter.modules[name] = LoraModule(name, prefix, a, b, scaling, bool(config.get("fan_in_fan_out")))
