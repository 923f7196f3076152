"""Which base architectures the engine serves exactly, and what it must read from their configs.

The engine runs the model's own forward, but with its own key/value pool, position ids and 4-D attention masks
(``engine/kv_pool.py``): whatever the model would have decided from a 2-D mask (causal, padding, sliding
windows) the engine must decide itself. So a family is served only when the parity matrix
(``tests/server/engine/test_architectures.py``) shows the engine's greedy tokens equal PEFT's on it, and every
config field that changes attention or positions in a way the engine does not reproduce stops start-up with
one line naming the field, rather than answering wrongly past some length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FULL, SLIDING = "full_attention", "sliding_attention"

# model_type -> how sliding windows reach the layers in transformers' modeling code: "none" (the family has
# no windows), "uniform" (``config.sliding_window`` applies to every layer when set: Mistral, Phi-3), or
# "layer_types" (``config.layer_types[i]`` says which layers slide: Qwen2, Qwen3). Exactly the matrix's families.
WINDOW_STYLE = {"llama": "none", "gemma": "none", "glm": "none", "mistral": "uniform", "phi3": "uniform",
                "qwen2": "layer_types", "qwen3": "layer_types"}

# Rotary types whose frequencies do not depend on the sequence length (the matrix covers each). "dynamic" and
# "longrope" rescale by the longest position in the whole batch, so a row's answer would depend on its
# neighbours (and differ from the same request alone): refused.
VERIFIED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Families whose partial rotary (rotating only the first part of each head) the matrix covers.
PARTIAL_ROTARY = ("glm", "phi3")
# Non-null fields that change the attention or the logits in ways the engine's masks do not reproduce.
UNSUPPORTED_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping", "attention_chunk_size",
                      "global_head_dim", "per_layer_config", "num_kv_shared_layers")


class UnsupportedModel(ValueError):
    """A base the engine would serve wrongly; the message names the config field."""


@dataclass(frozen=True)
class AttentionLayout:
    """Per layer type, its sliding window in key positions (None = full attention): a query at position q
    sees keys at positions k with ``q - k < window`` (transformers' ``sliding_window_overlay``)."""

    windows: dict[str, int | None]

    def masks(self, build: Callable[[int | None], torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The ``attention_mask`` argument for the model: ``build(window)`` once per distinct window; one tensor
        when every layer shares it (Mistral's and Phi-3's forwards take only a tensor), else a dict by layer
        type, which the forwards of models with ``layer_types`` (Qwen2, Qwen3) take as built masks."""
        built = {window: build(window) for window in set(self.windows.values())}
        if len(built) == 1:
            return next(iter(built.values()))
        return {kind: built[window] for kind, window in self.windows.items()}


def check_config(config: Any) -> AttentionLayout:
    """Refuse (``UnsupportedModel``) what the engine would serve wrongly; else the attention layout."""
    fields = config.to_dict()  # what the config file sets (attributes may be computed views)
    for field in UNSUPPORTED_FIELDS:  # first: the most precise reason (Gemma 2's soft-capping, say)
        if _set(fields.get(field)):
            raise UnsupportedModel(f"config.{field} = {fields[field]!r} is not supported")
    model_type = getattr(config, "model_type", None)
    if model_type not in WINDOW_STYLE:
        raise UnsupportedModel(f"config.model_type {model_type!r} is not served (supported: "
                               f"{', '.join(sorted(WINDOW_STYLE))})")
    _check_rope(fields, model_type)
    return AttentionLayout(_windows(config, WINDOW_STYLE[model_type]))


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != 0 and value != {}


def _check_rope(fields: dict[str, Any], model_type: str) -> None:
    params = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel("config.rope_parameters differs by layer type, which is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in VERIFIED_ROPE_TYPES:
        raise UnsupportedModel(f"config.rope_parameters.rope_type {rope_type!r} is not supported "
                               f"(supported: {', '.join(VERIFIED_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", fields.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0) and model_type not in PARTIAL_ROTARY:
        raise UnsupportedModel(f"config.partial_rotary_factor = {partial} is not supported for {model_type}")


def _windows(config: Any, style: str) -> dict[str, int | None]:
    window = getattr(config, "sliding_window", None)
    if style == "none":
        if window is not None:
            raise UnsupportedModel(f"config.sliding_window = {window}: {config.model_type} has no windowed layers")
        return {FULL: None}
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedModel(f"config.sliding_window = {window!r} must be a positive integer or null")
    if style == "uniform":
        return {SLIDING if window is not None else FULL: window}
    types = set(getattr(config, "layer_types", None) or [FULL])
    if not types <= {FULL, SLIDING}:
        raise UnsupportedModel(f"config.layer_types has {sorted(types - {FULL, SLIDING})}: not supported")
    if SLIDING in types and window is None:
        raise UnsupportedModel("config.layer_types has sliding layers but config.sliding_window is null")
    return {t: window if t == SLIDING else None for t in sorted(types)}
