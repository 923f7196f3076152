"""Prefill straight into the key/value pool: eager, or from a CUDA graph.

An eager prefill pays the host-side Python of a whole forward (~20 ms for a 7B model) whatever the prompt,
so short prompts arriving one by one keep the engine busy prefilling (bench/NOTES.md). Here the admitted
rows' prompts are left-padded to one length and written into their own pool rows as they are computed:
token t of row i lands at entry ``(t - pads[i]) mod T``, which puts the prompt at the front of the row
(where decode expects it) and the padding after it, where decode overwrites it before ever reading it.
Attention runs over the prompts' own keys with a left-padded causal mask; only the last position's logits
are computed. On CUDA the forward is captured per (rows bucket, prompt length bucket, LoRA rank bucket,
prefix bucket).

A row with a prefix adapter (P-Tuning v2) gets its V virtual key/values copied into entries 0..V-1 of its
pool row before the forward (outside any graph); its prompt then lands at entries V.., with position ids
from V, as PEFT counts them, and every prompt token also attends to the row's first V entries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..adapters.lora_slots import LoraSlotTable
from ..adapters.prefix import PrefixWeights
from ..model import BaseModel
from .decode_step import batch_bucket, power_bucket, rank_bucket
from .decoder import Forward
from .graphs import GraphCache
from .kv_pool import KvPool, causal_mask, prefill_mask
from .step_context import StepContext, run_forward

log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16  # tokens
MIN_PREFIX_BUCKET = 8  # virtual tokens


def prompt_bucket(n: int, limit: int) -> int:
    """Powers of two from 16: a prompt pads to less than twice its length."""
    return power_bucket(n, MIN_PROMPT_BUCKET, limit)


def prefix_bucket(n: int, limit: int) -> int:
    """0 without prefixes, else powers of two from 8 (prefix columns the attention reads, masked per row)."""
    return power_bucket(n, MIN_PREFIX_BUCKET, limit) if n else 0


class PrefillStep:
    def __init__(self, base: BaseModel, pool: KvPool, slots: LoraSlotTable, forward: Forward,
                 use_graphs: bool) -> None:
        self.base, self.pool, self.slots, self.forward = base, pool, slots, forward
        self.use_graphs = use_graphs and base.device.type == "cuda"
        self.bucketed = False  # pad to the graphs' shapes when eager too (CPU tests)
        self.graphs = GraphCache("prefill")
        self._inputs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # static, per shape

    def fits(self, first: int, prompts: Sequence[Sequence[int]], prefixes: Sequence[PrefixWeights | None]) -> bool:
        """Whether rows ``first``.. can take these prompts (the padded shape must fit the pool's limits)."""
        rows, length, prefix = self._shape(len(prompts), max(len(p) for p in prompts), _longest(prefixes))
        return first + rows <= self.pool.max_rows and prefix + length <= self.pool.max_capacity

    def run(self, first: int, prompts: Sequence[Sequence[int]], slots: Sequence[int],
            prefixes: Sequence[PrefixWeights | None]) -> torch.Tensor:
        """Prefill ``prompts`` (each after its prefix adapter's virtual tokens, if any) into pool rows
        ``first``.. and return each one's last-token logits [n, vocab]."""
        n = len(prompts)
        rows, length, prefix = self._shape(n, max(len(p) for p in prompts), _longest(prefixes))
        rank = self.slots.rank_of(slots)
        if self.use_graphs or self.bucketed:
            rank = rank_bucket(rank, self.slots.max_rank)
        self.pool.reserve(first + rows, prefix + length)
        for i, weights in enumerate(prefixes):
            if weights is not None:  # device copies into the row's first entries, before any replay
                self.pool.put(first + i, list(zip(weights.keys, weights.values, strict=True)))
        self.pool.touch(first, rows, prefix + length)
        key = (rows, length, rank, prefix)
        inputs = self._fill_inputs(key, first, prompts, slots, prefixes)
        if not self.use_graphs:
            return self._forward(key, inputs)[:n]
        try:
            graph, logits = self.graphs.get(key, (self.pool.generation, self.slots.wraps),
                                            lambda k: self.graphs.capture(lambda: self._forward(k, inputs)))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # a kernel that cannot be captured: prefill eagerly from now on
            log.warning("CUDA graph capture of a prefill failed (%s); prefilling eagerly from now on", exc)
            self.use_graphs = False
            self.graphs.clear()
            return self._forward(key, inputs)[:n]
        graph.replay()
        return logits[:n]

    def _shape(self, n: int, longest: int, longest_prefix: int) -> tuple[int, int, int]:
        if not (self.use_graphs or self.bucketed):
            return n, longest, longest_prefix
        return (batch_bucket(n, self.pool.max_rows), prompt_bucket(longest, self.pool.max_capacity),
                prefix_bucket(longest_prefix, self.pool.max_capacity))

    def _fill_inputs(self, key: tuple[int, ...], first: int, prompts: Sequence[Sequence[int]],
                     slots: Sequence[int], prefixes: Sequence[PrefixWeights | None]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static inputs of this shape: ``[2, rows, T]`` token ids and position ids, and ``[4, rows]`` padding,
        LoRA slot and virtual tokens per row, and the first pool row (in [2, 0]). Rows past the prompts are
        all padding and write into pool rows no live row uses."""
        rows, length = key[0], key[1]
        pad_id = self.base.tokenizer.pad_token_id or 0
        tokens = torch.zeros(2, rows, length, dtype=torch.long)
        tokens[0].fill_(pad_id)
        meta = torch.zeros(4, rows, dtype=torch.long)
        meta[0] = length
        meta[2, 0] = first
        for i, prompt in enumerate(prompts):
            pads = length - len(prompt)
            virtual = prefixes[i].num_virtual_tokens if prefixes[i] is not None else 0
            tokens[0, i, pads:] = torch.tensor(list(prompt))
            tokens[1, i, pads:] = torch.arange(virtual, virtual + len(prompt))  # PEFT counts the prefix first
            meta[0, i], meta[1, i], meta[3, i] = pads, slots[i], virtual
        if not self.use_graphs:  # eager: shapes vary freely, nothing to keep
            return tokens.to(self.base.device), meta.to(self.base.device)
        static = self._inputs.get(key)
        if static is None:
            static = self._inputs[key] = (torch.zeros_like(tokens, device=self.base.device),
                                          torch.zeros_like(meta, device=self.base.device))
        static[0].copy_(tokens)
        static[1].copy_(meta)
        return static

    def _forward(self, key: tuple[int, ...], inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, length, rank, prefix = key
        (ids, positions), (pads, slots, first, virtual) = inputs[0], (inputs[1][0], inputs[1][1], inputs[1][2, 0],
                                                                        inputs[1][3])
        t = torch.arange(length, device=ids.device)
        entry = (t[None, :] - pads[:, None]) % length + virtual[:, None]  # prompt after the prefix, padding last
        context = StepContext("prefill", self.slots.rows_for(slots, rank, "prefill"),
                              self.pool.prefill_view(first + torch.arange(rows, device=ids.device), entry, prefix))
        mask = self.base.attention.masks(
            lambda window: prefill_mask(pads, length, self.base.dtype, virtual, prefix, window))
        return self.forward(ids, positions, mask, context)

    # ------------------------------------------------------------------ the general path

    def through_cache(self, prompts: Sequence[Sequence[int]], prefixes: Sequence[PrefixWeights | None],
                      slots: Sequence[int]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, list[int]]:
        """The general prefill, for a padded shape the pool cannot take at once: left-padded, prefix adapters'
        virtual tokens in front, into a transient cache. Returns the last-token logits [n, vocab], the cache,
        the mask [n, prefix + T] of its live entries, and each row's next position id."""
        dev = self.base.device
        n, prompt_len = len(prompts), max(len(p) for p in prompts)
        virtual = [p.num_virtual_tokens if p is not None else 0 for p in prefixes]
        prefix_len = max(virtual)
        input_ids = torch.full((n, prompt_len), self.base.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, prompt_len), dtype=torch.long)
        prefix_mask = torch.zeros((n, prefix_len), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, prompt_len - len(prompt):] = torch.tensor(list(prompt))
            prompt_mask[i, prompt_len - len(prompt):] = 1
            prefix_mask[i, prefix_len - virtual[i]:] = 1
        # Prefix rows count their virtual tokens as positions 0..V-1, as PEFT does.
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(virtual)[:, None]
        mask = torch.cat([prefix_mask, prompt_mask], dim=1).to(dev)
        cache = DynamicCache()
        if prefix_len:
            self._fill_prefixes(cache, prefixes, prefix_len)
        context = StepContext("prefill", self.slots.rows_of(slots, "prefill"), cache)
        live = mask.bool()  # the model gets 4-D masks: transformers' own would count padding in its windows
        attention = self.base.attention.masks(lambda window: causal_mask(live, prompt_len, self.base.dtype, window))
        out = run_forward(self.base, context, input_ids=input_ids.to(dev), attention_mask=attention,
                          position_ids=positions.to(dev), logits_to_keep=1)
        return out.logits[:, -1, :], cache, mask, (positions[:, -1] + 1).tolist()

    def _fill_prefixes(self, cache: DynamicCache, prefixes: Sequence[PrefixWeights | None], prefix_len: int) -> None:
        """Each row's virtual key/values right-aligned in ``prefix_len`` columns; zeros (finite) before them."""
        base = self.base
        for layer in range(base.num_layers):
            k = torch.zeros(len(prefixes), base.num_kv_heads, prefix_len, base.head_dim, dtype=base.dtype,
                            device=base.device)
            v = torch.zeros_like(k)
            for i, prefix in enumerate(prefixes):
                if prefix is not None:
                    k[i, :, prefix_len - prefix.num_virtual_tokens:] = prefix.keys[layer]
                    v[i, :, prefix_len - prefix.num_virtual_tokens:] = prefix.values[layer]
            cache.update(k, v, layer)


def _longest(prefixes: Sequence[PrefixWeights | None]) -> int:
    return max((p.num_virtual_tokens for p in prefixes if p is not None), default=0)
