"""P-Tuning v2 / prefix tuning adapters: trained keys and values put in front of every attention layer.

PEFT saves a prefix adapter as one tensor, ``prompt_embeddings: [V, num_layers * 2 * kv_heads * head_dim]``
(with ``prefix_projection`` the saved table is already the projected output, so both kinds load the same).
Layer ``l``'s keys are column block ``2l`` and its values block ``2l + 1``, as in PEFT's ``get_prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FailedPrecondition
from .peft_format import PrefixConfig, largest, prefix_table


@dataclass
class PrefixWeights:
    """Per-layer prefix key/values, each ``[kv_heads, V, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys[0].shape[1]

    def to(self, device: torch.device, dtype: torch.dtype) -> PrefixWeights:
        """The tables on ``device`` in the serving ``dtype``; FailedPrecondition if the cast overflows (a value
        finite in fp32 can be inf in fp16)."""
        moved = PrefixWeights([k.to(device, dtype) for k in self.keys], [v.to(device, dtype) for v in self.values])
        tables = [t for pair in zip(moved.keys, moved.values, strict=True) for t in pair]
        if not bool(torch.stack([torch.isfinite(t).all() for t in tables]).all()):  # one sync on a GPU
            served = str(dtype).removeprefix("torch.")
            for i, table in enumerate(tables):
                kind = "values" if i % 2 else "keys"
                largest(f"prompt_embeddings (layer {i // 2} {kind}, in {served})", table)
        return moved


def parse_prefix(config: PrefixConfig, tensors: dict[str, torch.Tensor], num_layers: int, kv_heads: int,
                 head_dim: int) -> PrefixWeights:
    """Check a PEFT prefix-tuning adapter (read by ``peft_format``) against the base's shape and split it
    per layer."""
    table = prefix_table(config, tensors)
    v, width = table.shape
    expected = num_layers * 2 * kv_heads * head_dim
    if width != expected or (config.num_layers or num_layers) != num_layers:
        raise FailedPrecondition(
            f"prefix table is {v}x{width} for {config.num_layers} layers, but the base needs "
            f"{num_layers} layers x 2 x {kv_heads} kv heads x {head_dim} = {expected} columns: was it made "
            "for another base?")
    per_layer = table.view(v, num_layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # [2L, H, V, D]
    keys = [per_layer[2 * i].contiguous() for i in range(num_layers)]
    values = [per_layer[2 * i + 1].contiguous() for i in range(num_layers)]
    return PrefixWeights(keys=keys, values=values)
