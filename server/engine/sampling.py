"""Choosing each row's next token: greedy, or temperature / top-k / top-p sampling, with repetition
penalty and a minimum length. The filters are transformers' own logits processors, applied per row so
that every request keeps its own parameters and its own seeded generator.
"""

from __future__ import annotations

import secrets

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adapterd.server.engine.request import GenerationParams


class RowSampler:
    """The sampling state of one request: its processors and its random generator."""

    def __init__(self, params: GenerationParams, eos_token_ids: set[int], device: torch.device) -> None:
        self.params = params
        self.eos = sorted(eos_token_ids)
        # The seed used, reported back so that a sampled answer can be reproduced; 0 for greedy.
        self.seed = params.seed if params.seed is not None else (0 if params.greedy else secrets.randbits(63))
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty not in (0.0, 1.0) else None)
        warpers = LogitsProcessorList()
        if not params.greedy:
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                warpers.append(TopKLogitsWarper(params.top_k))
            if 0.0 < params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = warpers
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalty: the engine takes one argmax over the whole batch (after masking EOS for
        rows under their minimum length) instead of this row's own path."""
        return self.params.greedy and self.penalty is None

    def next_token(self, logits: torch.Tensor, seen_ids: torch.Tensor, generated: int) -> int:
        """``logits``: [vocab] for this row; ``seen_ids``: [1, n] prompt and generated ids so far.

        Computed so that no parameter can make an invalid distribution (on a GPU, ``torch.multinomial`` on
        one is a device-side assert that ends the CUDA context for every request): scores are made finite
        after the penalty (a tiny penalty turns a logit into inf), shifted so that the largest is 0 before the
        temperature divides them (a tiny temperature then sends the others to -inf, never the top to inf or
        NaN), and a distribution that still sums to no positive number becomes the argmax. No host sync."""
        scores = logits.float().unsqueeze(0)
        if generated < self.params.min_new_tokens and self.eos:
            scores[:, self.eos] = float("-inf")
        if self.penalty is not None:
            scores = self.penalty(seen_ids, scores)
        top = scores.argmax(-1, keepdim=True)
        if self.params.greedy:
            return int(top)
        finite = torch.finfo(scores.dtype).max
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=finite)
        scores = self.warpers(seen_ids, scores - scores.max(-1, keepdim=True).values)
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs,
                            torch.zeros_like(probs).scatter_(-1, top, 1.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))
