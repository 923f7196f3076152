"""The batched tensor operations of sampling, on ``[rows, vocab]`` float32 scores with per-row parameters.

Each op works row by row in effect (no row's values reach another's), runs on any device without a host
sync, and never raises on any value a model or a parameter can produce: a row with NaN, infinite or all -inf
scores still yields a token for its row (the engine ends such a row alone on its own finite check).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on every row at once: a seen token's score is divided
    by its row's penalty if positive, multiplied if negative. ``seen``: [rows, vocab] bool; ``penalty``:
    [rows] (1 leaves a row's scores exactly as they are: x * 1 and x / 1 are x)."""
    factor = penalty[:, None]
    penalised = torch.where(scores < 0, scores * factor, scores / factor)
    return torch.where(seen, penalised, scores)


def shift_and_scale(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Scores made finite (NaN -> -inf, +inf -> the largest float: a tiny penalty sends a logit to inf),
    shifted so that each row's largest is 0, then divided by the row's temperature. After the shift a tiny
    temperature sends the other scores to -inf and never the top one to inf or NaN."""
    finite = torch.nan_to_num(scores, nan=NEG_INF, posinf=torch.finfo(scores.dtype).max)
    return (finite - finite.amax(-1, keepdim=True)) / temperature[:, None]


def filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       largest_k: int | None = None) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, per row, for the whole batch at once.

    ``top_k``: [rows] in 1..vocab (vocab: off); scores below a row's k-th largest become -inf (ties with it
    stay). ``top_p``: [rows] (1: off); in ascending order, tokens whose cumulative probability is at most
    1 - p become -inf, the largest always staying. ``largest_k``: the largest of ``top_k`` when every row's
    is below the vocabulary; then only each row's ``largest_k`` best are ordered (torch.topk), not the whole
    vocabulary (a sort of [rows, vocab] is most of the cost). Float ties with a k-th score past the
    ``largest_k`` best are then kept without being counted by top-p."""
    if largest_k is None:
        ordered, order = scores.sort(dim=-1)  # ascending, as transformers' top-p sorts
        kth = ordered.gather(-1, (scores.shape[-1] - top_k)[:, None])
        ordered = ordered.masked_fill(ordered < kth, NEG_INF)
        ordered = ordered.masked_fill(_outside_nucleus(ordered, top_p), NEG_INF)
        return torch.empty_like(scores).scatter_(-1, order, ordered)
    best, order = scores.topk(largest_k, dim=-1)  # descending
    kth = best.gather(-1, (top_k - 1)[:, None])
    kept = scores.masked_fill(scores < kth, NEG_INF)
    drop = _outside_nucleus(best.masked_fill(best < kth, NEG_INF).flip(-1), top_p)
    return kept.masked_fill(torch.zeros_like(kept, dtype=torch.bool).scatter_(-1, order.flip(-1), drop), NEG_INF)


def _outside_nucleus(ascending: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of these ascending scores top-p drops: those whose cumulative probability is at most 1 - p,
    never the last (largest)."""
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)[:, None]
    drop[:, -1] = False
    return drop


def draw(scores: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from ``softmax(scores)``, by the exponential race: ``argmax(probs / q)`` with ``q``
    drawn from the row's own generator (rows without one are not drawn for: their result is unused). -1 for a
    row whose distribution is empty (all -inf or NaN): its caller falls back to the argmax."""
    probs = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0)
    has_mass = probs.sum(-1) > 0
    q = torch.ones_like(probs)
    for i, generator in enumerate(generators):
        if generator is not None:
            q[i].exponential_(generator=generator)  # vocab draws from this row's stream, whatever the batch
    # An exponential draw of exactly 0 would make 0 / 0 = NaN, which argmax would pick.
    raced = probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(-1)
    return torch.where(has_mass, raced, -1)


def ban_eos_(scores: torch.Tensor, banned: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """transformers' MinNewTokensLengthLogitsProcessor on every row at once, in place: the ``eos`` columns at -inf
    in the rows where ``banned`` ([rows] bool); returns ``scores``."""
    scores[:, eos] = scores[:, eos].masked_fill(banned[:, None], NEG_INF)
    return scores


def greedy_pick(logits: torch.Tensor, bans: torch.Tensor | None = None,
                eos: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, 2]`` long: each row's argmax (a greedy row's token) and 1 where all its logits are finite, else
    0; where ``bans`` (``[rows]``, nonzero: the row is under its minimum length) the ``eos`` ids count as -inf,
    as the sampler's own minimum length sets them. The decode step computes it inside its CUDA graph, so that a
    batch of greedy rows needs no sampling launch of its own (``sampling.BatchSampler.launch``): the same argmax
    and check the sampler would run (``kernels/greedy_pick.py`` is the same in one launch)."""
    scores = logits
    if bans is not None and eos is not None and eos.numel():
        scores = ban_eos_(logits.clone(), bans != 0, eos)
    return torch.stack([scores.argmax(-1), torch.isfinite(logits).all(-1).long()], -1)
