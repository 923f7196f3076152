"""The engine's own decoder forward for the pre-norm families it serves most: Llama, Mistral, Qwen2, Qwen3, GLM.

transformers' forward is generic: per call it builds masks from a 2-D mask (``create_causal_mask``), dispatches
attention through an interface table, and goes through the ``Cache`` API, each behind layers of Python and
small kernels. The engine already decides positions, masks and where keys and values live (``kv_pool.py``), so
here the layer loop is written out the way gpt-fast's ``model.py`` is, with every per-step input an argument:

    h = embed(ids)
    cos, sin = rotary(h, positions)                  # the model's own rotary module: its scaling type included
    for each layer:
        x = input_norm(h)
        q, k, v = q_proj(x), k_proj(x), v_proj(x)    # [rows, heads, T, head_dim]; Qwen3 norms q and k per head;
                                                     # with LoRA, one shrink for the three (lora.project_qkv)
        q, k = apply_rotary(q, k, cos, sin)          # the family's own function (GLM: half of each head, interleaved)
        K, V = cache.update(k, v, layer)             # writes this step's entries, returns what attention reads
        h = h + o_proj(sdpa(q, K, V, mask[layer]))   # one fused attention call, grouped key/value heads as they are
        h = h + mlp(post_attention_norm(h))
    logits = lm_head(norm(h[:, -1]))                 # the last position only

The modules called are the checkpoint's own (``q_proj``, ``mlp``, the norms, the rotary embedding), so their
weights, bitsandbytes' int8 / nf4 layers, the engine's kernel swaps (``swaps.py``) and the LoRA layers
(``adapters/lora.py``) work unchanged; only the loop and the attention are ours. Other families keep
transformers' forward (``model_forward``). Parity with PEFT judges both paths (``tests/server/engine``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import project_qkv
from .step_context import StepContext, run_forward, step_context

if TYPE_CHECKING:
    from ..model import BaseModel

# model_type -> the pre-norm decoder layer this file runs (input norm, attention, residual, post-attention
# norm, MLP, residual); anything else in a family's layer (Gemma's scaled embeddings, Phi-3's fused qkv) is
# not here, and such a family keeps transformers' forward.
OWN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "glm")

Mask = torch.Tensor | dict[str, torch.Tensor]
# (input ids [rows, T], position ids [rows, T], additive mask(s), the step's context: its LoRA rows and its
# key/value cache view) -> the last position's logits [rows, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, Mask, StepContext], torch.Tensor]


class Decoder:
    """The decoder forward above, over a loaded causal LM of one of ``OWN_FAMILIES`` (whose modules it calls;
    it owns none)."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        # Each family's rotary function, from its own modeling module: GLM's rotates the first half of each
        # head, interleaved; the others the whole head, halves paired.
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        types = getattr(model.config, "layer_types", None)
        self.layer_types: list[str] = list(types) if types else ["full_attention"] * len(self.layers)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, context: StepContext) -> torch.Tensor:
        """The engine's ``Forward``: the loop inside the step's context (its LoRA rows), over its cache view."""
        with step_context(context):
            return self.forward(ids, positions, mask, context.cache)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, cache: Any) -> torch.Tensor:
        """The loop itself, over any cache whose ``update(k, v, layer)`` returns what attention reads."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)
        for index, layer in enumerate(self.layers):
            layer_mask = mask[self.layer_types[index]] if isinstance(mask, dict) else mask
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, layer_mask, cache, index)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h[:, -1:, :]))[:, -1, :]

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, cache: Any, index: int) -> torch.Tensor:
        rows, length = x.shape[:2]
        shape = (rows, length, -1, attn.head_dim)
        q, k, v = (t.view(shape) for t in project_qkv(attn, x))  # LoRA on them: one shrink for the three
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head of q and k, before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        keys, values = cache.update(k, v, index)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                             scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1])
        return attn.o_proj(out.transpose(1, 2).reshape(rows, length, -1))


def uses_own_decoder(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in OWN_FAMILIES


def model_forward(base: BaseModel, own: bool) -> Forward:
    """The forward the engine's steps call, inside their step's context: ours for ``OWN_FAMILIES`` when
    ``own``, else transformers'."""
    if own and uses_own_decoder(base.model):
        return Decoder(base.model)

    def transformers_forward(ids: torch.Tensor, positions: torch.Tensor, mask: Mask,
                             context: StepContext) -> torch.Tensor:
        out = run_forward(base, context, input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=1)
        return out.logits[:, -1, :]

    return transformers_forward
