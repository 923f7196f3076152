"""The engine's own decoder forward for the pre-norm families it serves most: Llama, Mistral, Qwen2, Qwen3, GLM.

transformers' forward is generic: per call it builds masks from a 2-D mask (``create_causal_mask``), dispatches
attention through an interface table, and goes through the ``Cache`` API, each behind layers of Python and
small kernels. The engine already decides positions, masks and where keys and values live (``kv_pool.py``), so
here the layer loop is written out the way gpt-fast's ``model.py`` is, with every per-step input an argument:

    h = embed(ids)
    cos, sin = rotary(h, positions)                  # the model's own rotary module: its scaling type included
    for each layer:
        x = input_norm(h)
        q, k, v = split(qkv_proj(x))                 # [rows, heads, T, head_dim]; one matmul over the three's
                                                     # fused weight; Qwen3 norms q and k per head; with LoRA, one
                                                     # shrink for the three (lora.project_qkv), each delta added
        q, k = apply_rotary(q, k, cos, sin)          # the family's own function (GLM: half of each head, interleaved)
        K, V = cache.update(k, v, layer)             # writes this step's entries, returns what attention reads
                                                     # (a decode step on a GPU: rotation and writes in one kernel,
                                                     # which adds q, k and v's LoRA deltas too: lora_folds.py;
                                                     # at one row on int8 weights without LoRA there, in the
                                                     # q/k/v GEMV's epilogue: int8_epilogues.py)
        h = h + o_proj(sdpa(q, K, V, mask[layer]))   # one fused attention call, grouped key/value heads as they are
                                                     # (a decode step on a GPU: split along the keys, ours; its
                                                     # merge also runs o_proj's LoRA shrink)
        x = post_attention_norm(h)                   # with the add above, one kernel where the norm is fused
                                                     # (at 32 rows or more it adds o_proj's LoRA delta too)
        gate, up = split(gate_up_proj(x))            # fused too (Llama's MLP: not GLM's, one module already);
                                                     # LoRA on both: one shrink for the two (lora.project_shared)
        h = h + down_proj(act(gate) * up)            # act: the MLP's own (a SiLU and the product: one kernel
                                                     # where it runs, torch's roundings, which at a decode step
                                                     # adds gate and up's LoRA deltas first; at one row, in the
                                                     # gate/up GEMV's epilogue); the add fused with the next
                                                     # layer's input norm likewise (down_proj's delta in it at
                                                     # 32 rows or more)
    logits = lm_head(norm(h[:, -1]))                 # the last position only

The modules called are the checkpoint's own (``o_proj``, the norms, the rotary embedding), so their weights,
bitsandbytes' int8 / nf4 layers, the engine's kernel swaps (``swaps.py``) and the LoRA layers
(``adapters/lora.py``) work unchanged; the fused q/k/v and gate/up matmuls (``fused_projections.py``) read the
same memory as the modules, whose weights become views of them, and projections that cannot be fused are
called as modules. Only the loop, the fused matmuls and the attention are ours. Other families keep
transformers' forward (``model_forward``). Parity with PEFT judges both paths (``tests/server/engine``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import GATE_UP, QKV, add_delta, adds_delta, base_layer_of, project_qkv, project_shared
from ..adapters.lora_folds import (
    add_expand,
    add_glu_deltas,
    add_output_delta,
    add_qkv_deltas,
    deferred_delta,
    deferred_in_matmul,
    defers_delta,
    expand_in_matmul,
    glu_in_matmul,
    glu_shrink,
    o_proj_shrink_in_merge,
    output_delta,
    output_shrink,
    project_glu_deferred,
    project_qkv_deferred,
    qkv_in_matmul,
    qkv_shrink,
)
from ..kernels import decode_attention as attention_kernel
from ..kernels import dense_gemv, dense_splitk
from ..kernels import silu_mul as act_kernel
from ..kernels.rms_norm import FusedRMSNorm, OutputDelta
from ..kernels.rope_append import fits, rope_append_available
from .fused_projections import FusedLinear, LayerFusion, fuse_layers, fused_outputs, int8_layers
from .kv_pool import DecodeView
from .side_stream import beside
from .step_context import StepContext, run_forward, step_context

if TYPE_CHECKING:
    from ..kernels.lora_bgmv import LoraPartials
    from ..model import BaseModel

log = logging.getLogger(__name__)

# model_type -> the pre-norm decoder layer this file runs (input norm, attention, residual, post-attention
# norm, MLP, residual); anything else in a family's layer (Gemma's scaled embeddings, Phi-3's fused qkv) is
# not here, and such a family keeps transformers' forward.
OWN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "glm")
# Those whose apply_rotary_pos_emb is Llama's: x * cos + rotate_half(x) * sin over the whole head (GLM rotates
# half of each head, interleaved). Partial rotary in these is ruled out per call by ``fits``.
ROTATE_HALF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Decode steps of this many rows or more leave o_proj's and down_proj's LoRA deltas to the add + norm kernel after
# them (``_output``, ``rms_norm.OutputDelta``): one program a row reads the row's whole B (128 KB at rank 16 on a
# 7B model) before its PDL wait, where the expand's own launch spreads it over 16 programs a row; a launch saved a
# layer. pdl_bench --switch fold on the H200 (a1b010a, bench/RESULTS.md) measured the fold ahead at every row count
# it timed: int8 +0.8 / +1.1 / +0.6 / +0.2% a step at 1 / 8 / 32 / 64 rows, bf16 +0.7 / +0.7 / +0.4 / +0.1%.
NORM_FOLD_MIN_ROWS = 1

Mask = torch.Tensor | dict[str, torch.Tensor]
# (input ids [rows, T], position ids [rows, T], additive mask(s), the step's context: its LoRA rows and its
# key/value cache view) -> the last position's logits [rows, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, Mask, StepContext], torch.Tensor]


class Decoder:
    """The decoder forward above, over a loaded causal LM of one of ``OWN_FAMILIES`` (whose modules it calls;
    it owns none). ``fuse``: fuse each layer's q/k/v and gate/up base projections (in place: the modules'
    weights become views of the fused ones); without it every projection is its module's own matmul.
    ``rope_kernel``: decode steps rotate and append through ``kernels/rope_append.py`` and attend through
    ``kernels/decode_attention.py`` where they run, and the MLP's SiLU and product run as one kernel
    (``kernels/silu_mul.py``)."""

    def __init__(self, model: nn.Module, fuse: bool = True, rope_kernel: bool = True) -> None:
        inner = model.model
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        # Each family's rotary function, from its own modeling module: GLM's rotates the first half of each
        # head, interleaved; the others the whole head, halves paired.
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        types = getattr(model.config, "layer_types", None)
        self.layer_types: list[str] = list(types) if types else ["full_attention"] * len(self.layers)
        self.fused = fuse_layers(self.layers) if fuse else [LayerFusion()] * len(self.layers)
        # Decode steps: the rotation of q and k and the key/value append as one kernel (kernels/rope_append.py),
        # for the families whose rotary function is Llama's (the whole head, halves paired), where it runs.
        self.rope_kernel = (rope_kernel and model.config.model_type in ROTATE_HALF_FAMILIES
                            and rope_append_available(self.embed.weight.device))
        # The MLP's silu(gate) * up in one launch (kernels/silu_mul.py; torch's roundings) where it runs, and
        # decode steps' attention split along the keys, skipping what each row's mask hides
        # (kernels/decode_attention.py)
        device = self.embed.weight.device
        self.act_kernel = rope_kernel and act_kernel.silu_mul_available(device)
        self.attention_kernel = rope_kernel and attention_kernel.decode_attention_available(device)
        # One-row float matmuls through the GEMV kernel (kernels/dense_gemv.py) for the shapes where its warm-up
        # (``model_forward``, before any graph capture) did not find F.linear clearly faster
        self.gemv = rope_kernel and dense_gemv.dense_gemv_available(device)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, context: StepContext) -> torch.Tensor:
        """The engine's ``Forward``: the loop inside the step's context (its LoRA rows), over its cache view."""
        with step_context(context):
            return self.forward(ids, positions, mask, context.cache)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Mask, cache: Any) -> torch.Tensor:
        """The loop itself, over any cache whose ``update(k, v, layer)`` returns what attention reads."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)
        x = self.layers[0].input_layernorm(h)
        for index, layer in enumerate(self.layers):
            layer_mask = mask[self.layer_types[index]] if isinstance(mask, dict) else mask
            fused = self.fused[index]
            attention, delta = self._attention(layer.self_attn, x, cos, sin, layer_mask, cache, index, fused.qkv)
            h, x = _add_norm(h, attention, layer.post_attention_layernorm, delta)
            out, delta = _mlp(layer.mlp, x, fused.gate_up, self.act_kernel, self.gemv)
            if index + 1 < len(self.layers):  # the residual add with the next layer's input norm
                h, x = _add_norm(h, out, self.layers[index + 1].input_layernorm, delta)
            else:
                h = h + (out if delta is None else add_output_delta(delta, out))
        return _linear(self.lm_head, self.norm(h[:, -1:, :]), self.gemv)[:, -1, :]

    def gemv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
        """(weight, bias, glu) of every float matmul that ``_linear`` may hand to the GEMV kernel: the fused q/k/v
        and gate/up, o_proj and down_proj (under any LoRA wrapper) and lm_head; ``dense_gemv.warm_up`` tunes them
        and judges each against ``F.linear``, a fused gate/up whose one-row step takes the SiLU product from the
        GEMV's epilogue (``glu``: where the kernels run and the MLP's activation is a SiLU) with it."""
        weights: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []
        for layer, fusion in zip(self.layers, self.fused, strict=True):
            glu = self.act_kernel and act_kernel.is_silu(getattr(layer.mlp, "act_fn", None))
            for fused, epilogue in ((fusion.qkv, False), (fusion.gate_up, glu)):
                if fused is not None and type(fused.matmul) is nn.Linear:
                    weights.append((fused.matmul.weight, fused.matmul.bias, epilogue))
        modules = [base_layer_of(m) for layer in self.layers for m in (layer.self_attn.o_proj,
                                                                       getattr(layer.mlp, "down_proj", None))
                   if m is not None]
        return weights + [(m.weight, m.bias, False) for m in (*modules, base_layer_of(self.lm_head))
                          if type(m) is nn.Linear]

    def splitk_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of the float matmuls that may run through the split-K kernel at 2-64 rows where
        ``dense_splitk`` is switched on (``dense_splitk.warm_up`` tunes them): ``gemv_weights``' (the fused q/k/v and
        gate/up, o_proj, down_proj, lm_head)."""
        return [(w, b) for w, b, _ in self.gemv_weights()]

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   cache: Any, index: int, qkv: FusedLinear | None) -> tuple[torch.Tensor, OutputDelta | None]:
        """o_proj's output for the attention of x, and its LoRA delta where that is left for the norm after it."""
        rows, length = x.shape[:2]
        shape = (rows, length, -1, attn.head_dim)
        # The base outputs from one fused matmul where q, k, v are fused; LoRA on them: one shrink for the three,
        # and at a decode step whose rotation is the kernel's, their deltas added by that kernel (one launch)
        rope_kernel = self.rope_kernel and isinstance(cache, DecodeView)
        q = self._project_rotate_append(attn, x, cos, sin, cache, index, qkv) if rope_kernel else None
        if q is not None:  # one row: the projection's own launch rotated q and k and appended k and v
            keys, values = cache.read(index)
            return self._attend(attn, q, keys, values, mask, cache, rows, length)
        if rope_kernel and not hasattr(attn, "q_norm"):  # the base matmul and the shrink: one launch, or two
            deltas, base = qkv_in_matmul(attn, x, qkv) or beside(
                x, lambda: qkv_shrink(attn, x), lambda: fused_outputs(qkv, attn, x, self.gemv))
            qkv_out = project_qkv_deferred(attn, x, base, deltas)
        else:
            qkv_out, deltas = project_qkv(attn, x, fused_outputs(qkv, attn, x, self.gemv)), None
        q, k, v = (t.view(shape) for t in qkv_out)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head of q and k, before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rope_kernel and fits(q, k, v, cos, sin) and (deltas is None or deltas.fits(q, k)):
            q, keys, values = cache.append_rotated(q, k, v, cos, sin, index, deltas)  # a decode step: one launch
        else:
            if deltas is not None:
                add_qkv_deltas(deltas, q, k, v)
            q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys, values = cache.update(k, v.transpose(1, 2), index)
        return self._attend(attn, q, keys, values, mask, cache, rows, length)

    def _project_rotate_append(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               cache: DecodeView, index: int, qkv: FusedLinear | None) -> torch.Tensor | None:
        """At a one-row decode step without LoRA on q, k or v (nor Qwen3's per-head norms, which come before
        the rotation): the fused int8 q/k/v matmul with the rotation and the append in its epilogue
        (``FusedLinear.rope_append``: the same values as the matmul, then ``kernels/rope_append.py``), returning
        the rotated query; None where that does not run (nothing written)."""
        if (qkv is None or not qkv.current(attn) or hasattr(attn, "q_norm")
                or any(adds_delta(getattr(attn, name)) for name in QKV)):
            return None
        keys, values = cache.layer(index)
        return qkv.rope_append(x, cos, sin, keys, values, cache.write_pos, attn.head_dim,
                               qkv.sizes[0] // attn.head_dim)

    def _attend(self, attn: nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                cache: Any, rows: int, length: int) -> tuple[torch.Tensor, OutputDelta | None]:
        """o_proj of the attention of ``q`` (``[rows, heads, T, head_dim]``, rotated) over ``keys``/``values``, and
        its LoRA delta where that is left to the post-attention add + norm (``_output``)."""
        shrink = None
        if (self.attention_kernel and isinstance(cache, DecodeView)
                and attention_kernel.fits(q, keys, values, mask)
                and attention_kernel.faster_than_sdpa(rows, q.shape[1] // keys.shape[1], q.device)):
            # o_proj's LoRA shrink in the merge (each head's output is a split of o_proj's input): no launch of its own
            # (or in o_proj's own matmul launch where switched on: ``_output``'s ``deferred_in_matmul``)
            shrink = output_shrink(attn.o_proj, rows, q.shape[1]) if o_proj_shrink_in_merge(attn.o_proj) else None
            shrink = shrink if shrink is not None and shrink.fits(q) else None
            # where it pays, the keys and values but the entry the append just wrote are read before the PDL wait
            fresh = cache.write_pos if attention_kernel.prefetch_pays(rows, q.shape[1] // keys.shape[1]) else None
            out = attention_kernel.decode_attention(q, keys, values, mask, attn.scaling, shrink=shrink, fresh=fresh)
        else:
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1])
        return _output(attn.o_proj, out.transpose(1, 2).reshape(rows, length, -1), self.gemv,
                       None if shrink is None else shrink.partials)


def _add_norm(h: torch.Tensor, out: torch.Tensor, norm: nn.Module,
              delta: OutputDelta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream ``h + out`` and ``norm`` of it: one kernel where the norm is the fused one
    (``FusedRMSNorm.add_forward``: the same tensors as the two steps), else the two steps. ``delta``: ``out``'s
    LoRA delta, added first: in that kernel where it takes it, else by the expand's own launch."""
    if isinstance(norm, FusedRMSNorm) and (delta is None or norm.takes(h, out, delta)):
        return norm.add_forward(h, out, delta)
    if delta is not None:
        out = add_output_delta(delta, out)
    h = h + out
    return h, norm(h)


def _linear(module: nn.Module, x: torch.Tensor, gemv: bool, partials: LoraPartials | None = None) -> torch.Tensor:
    """``module(x)``; with ``gemv``, a plain float ``nn.Linear`` (or one under a LoRA wrapper, whose delta is
    added as its forward adds it) runs through the GEMV kernel where ``dense_gemv.chosen`` (one row, a shape
    that warm-up found faster there). ``partials``: the LoRA wrapper's shrink, already done (``output_shrink``):
    its base output plus the expand only."""
    base = base_layer_of(module)
    if gemv and type(base) is nn.Linear and dense_gemv.chosen(x, base.weight, base.bias):
        y = dense_gemv.gemv(x, base.weight, base.bias)
    elif gemv and type(base) is nn.Linear and dense_splitk.chosen(x, base.weight, base.bias):
        y = dense_splitk.splitk_linear(x, base.weight, base.bias)
    elif partials is not None:
        y = base(x)
    else:
        return module(x)
    return add_delta(module, x, y) if partials is None else add_expand(module, y, partials)


def _output(module: nn.Module, x: torch.Tensor, gemv: bool,
            partials: LoraPartials | None = None) -> tuple[torch.Tensor, OutputDelta | None]:
    """A layer whose output the residual add + norm kernel takes next (o_proj, down_proj): ``_linear(module, x,
    gemv, partials)``, or at a decode step of ``NORM_FOLD_MIN_ROWS`` rows or more its base output and its LoRA
    delta still to add, its expand left to that kernel (``partials``: its shrink, already done in the attention's
    merge, the delta's sums then in the base matmul's launch where ``expand_in_matmul`` runs; else
    ``deferred_delta`` launches the shrink now)."""
    folds = x.shape[0] >= NORM_FOLD_MIN_ROWS
    if folds and partials is not None:  # the expand's sums in the matmul's launch where switched on, else the norm's
        delta = output_delta(module, partials)
        return expand_in_matmul(module, x, delta) or (_linear(base_layer_of(module), x, gemv), delta)
    if folds and defers_delta(module):  # its shrink in, after or beside the base matmul
        delta, y = deferred_in_matmul(module, x) or beside(
            x, lambda: deferred_delta(module, x), lambda: _linear(base_layer_of(module), x, gemv))
        return y, delta
    return _linear(module, x, gemv, partials), None


def _mlp(mlp: nn.Module, x: torch.Tensor, gate_up: FusedLinear | None, fused_act: bool = False,
         gemv: bool = False) -> tuple[torch.Tensor, OutputDelta | None]:
    """The MLP of x: its own forward, or where gate and up are fused (only for Llama's MLP forward,
    ``fuse_mlp``), that forward's math over the fused matmul's split, each wrapped layer's LoRA delta added to
    its own part. ``act_fn`` is the MLP's own (``ACT2FN[config.hidden_act]``); with ``fused_act``, a SiLU
    and its product with ``up`` run as one kernel (the same values), or at one row without LoRA deltas on gate
    or up, in the fused matmul's epilogue (``FusedLinear.silu_glu``: one launch fewer a layer). With down_proj's
    LoRA delta where it is left to the add + norm after it (``_output``)."""
    if (fused_act and gate_up is not None and gate_up.current(mlp) and act_kernel.is_silu(mlp.act_fn)
            and not any(adds_delta(getattr(mlp, name)) for name in GATE_UP)):
        act = gate_up.silu_glu(x, gemv)  # one row: the SiLU product in the matmul's epilogue, the same values
        if act is not None:
            return _output(mlp.down_proj, act, gemv)
    if gate_up is None or not gate_up.current(mlp):
        return mlp(x), None
    if fused_act and act_kernel.is_silu(mlp.act_fn):
        # LoRA on both at a decode step: one shrink (in, after or beside the base matmul), the deltas added
        # by the SiLU product's kernel (no expand)
        deltas, base = glu_in_matmul(mlp, x, gate_up) or beside(x, lambda: glu_shrink(mlp, x), lambda: gate_up(x, gemv))
        gate, up = project_glu_deferred(mlp, x, base, deltas)
        if act_kernel.fits(gate, up) and (deltas is None or deltas.fits(gate, up)):
            return _output(mlp.down_proj, act_kernel.silu_mul(gate, up, deltas), gemv)
        if deltas is not None:
            add_glu_deltas(deltas, gate, up)
    else:
        gate, up = project_shared(mlp, GATE_UP, x, gate_up(x, gemv))  # LoRA on both: one shrink, one expand
    return _output(mlp.down_proj, mlp.act_fn(gate) * up, gemv)


def uses_own_decoder(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in OWN_FAMILIES


def model_forward(base: BaseModel, own: bool, max_rows: int = 64, fused_kernels: bool = True) -> Forward:
    """The forward the engine's steps call, inside their step's context: ours for ``OWN_FAMILIES`` when
    ``own``, else transformers'. ``max_rows``: the most rows a decode step runs (the int8 kernel is tuned for
    the fused shapes up to it, as ``swaps.use_int8_kernel`` tunes the model's own). ``fused_kernels``: the
    engine's switch of that name (off: no rotary + append kernel either)."""
    if own and uses_own_decoder(base.model):
        decoder = Decoder(base.model, rope_kernel=fused_kernels)
        fused_int8 = int8_layers(decoder.fused)
        if fused_int8:  # their shapes are new to the int8 kernel: tune it now, before any graph capture
            from ..kernels.int8_linear import warm_up

            warm_up(fused_int8, base.dtype, max_rows=max_rows)
        if decoder.gemv and decoder.embed.weight.is_cuda:  # tuned and timed against F.linear before any capture
            times = dense_gemv.warm_up(decoder.gemv_weights())
            log.info("GEMV kernel against F.linear at one row, us: %s", ", ".join(
                f"{n}x{k} {ours:.1f}/{theirs:.1f}" for (n, k), (ours, theirs) in sorted(times.items())) or "none")
            if dense_splitk.IN_DECODE:  # switched on: its tiles tuned now (a shape not tuned keeps F.linear)
                dense_splitk.warm_up(decoder.splitk_weights(), [b for b in dense_splitk.BUCKETS if b // 2 < max_rows])
        return decoder

    def transformers_forward(ids: torch.Tensor, positions: torch.Tensor, mask: Mask,
                             context: StepContext) -> torch.Tensor:
        out = run_forward(base, context, input_ids=ids, position_ids=positions, attention_mask=mask, logits_to_keep=1)
        return out.logits[:, -1, :]

    return transformers_forward
