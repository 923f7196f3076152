"""Choosing every row's next token at once: greedy, or temperature / top-k / top-p sampling, with repetition
penalty and a minimum length, each row with its own parameters and its own seeded generator.

``BatchSampler`` holds the parameters of the running batch as tensors indexed by batch position (written
when rows join, moved when rows leave, as the key/value pool's rows are) and applies them to the whole
``[rows, vocab]`` logits in a few batched ops. The random draw is the exponential race (vLLM v1's sampler
does the same): ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn for each sampled row from that row's own
generator, which picks token i with probability ``probs[i]`` and needs no ``torch.multinomial`` (a host sync,
and a device-side assert on an invalid distribution). A row's draw reads only its own generator: the same
seed gives the same tokens whatever shares the batch. The batch's tokens come back in one device->host copy.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence

import torch

from .failures import is_device_failure
from .request import GenerationParams
from .sampling_ops import apply_repetition_penalty, ban_eos_, draw, filter_top_k_top_p, shift_and_scale

log = logging.getLogger(__name__)


def logits_width(model: torch.nn.Module) -> int:
    """The number of logits a forward gives per position (the output layer's features; int8 and nf4 layers
    keep ``out_features`` too)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", 0) or model.config.vocab_size)


class RowSampler:
    """One request's sampling choices, fixed at submission: its parameters (normalised: off is 1 or none),
    the seed it reports, and its generator (sampled rows only)."""

    def __init__(self, params: GenerationParams, device: torch.device) -> None:
        self.params = params
        # The seed used, reported back so that a sampled answer can be reproduced; 0 for greedy.
        self.seed = params.seed if params.seed is not None else (0 if params.greedy else secrets.randbits(63))
        self.sampled = not params.greedy
        self.temperature = params.temperature if self.sampled else 1.0  # read for sampled rows only
        self.top_k = params.top_k if self.sampled and params.top_k > 0 else 0  # 0: off
        self.top_p = params.top_p if self.sampled and 0.0 < params.top_p < 1.0 else 1.0  # 1: off
        self.penalty = params.repetition_penalty if params.repetition_penalty not in (0.0, 1.0) else 1.0
        self.chosen = 0  # tokens chosen for the row so far (counted at launch, before the device has them)
        self.generator: torch.Generator | None = None
        if self.sampled:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    @property
    def penalised(self) -> bool:
        return self.penalty != 1.0

    @property
    def plain(self) -> bool:
        """Greedy with no penalty and no minimum length: the row's token is its logits' argmax."""
        return not (self.sampled or self.penalised or self.params.min_new_tokens)

    @property
    def picked_in_step(self) -> bool:
        """Greedy with no penalty: the decode step's own pick is the row's token (``DecodeStep``'s greedy pick
        bans end-of-sequence ids where ``eos_banned``, so a minimum length is kept there too)."""
        return not (self.sampled or self.penalised)

    @property
    def eos_banned(self) -> bool:
        """Whether the row's next token may not be an end-of-sequence id: fewer than ``min_new_tokens`` chosen."""
        return self.params.min_new_tokens > self.chosen

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


class SampledTokens:
    """One step's chosen tokens: on the device (``tokens``, [rows] long, -1 where a row's sampling raised)
    and, once ``result()`` returns, on the host with each row's finite flag. On a GPU the copy to the host is
    queued into page-locked memory behind the sampling ops and an event marks its end, so nothing here waits
    for the device until ``result()``. ``pairs``: the two already side by side (``[rows, 2]``: token, finite
    as 0 or 1), as the decode step's ``greedy_pick`` gives them: no stacking launch."""

    def __init__(self, tokens: torch.Tensor, finite: torch.Tensor | None = None,
                 pairs: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        both = torch.stack([tokens, finite.long()], -1) if pairs is None else pairs  # [rows, 2]
        self._event: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = torch.empty(both.shape, dtype=torch.long, pin_memory=True)
            self._host.copy_(both, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # a copy: ``pairs`` may be a step's output buffer that the next step overwrites before this is read
            self._host = both if pairs is None else both.clone()
        self._result: tuple[list[int], list[bool]] | None = None

    def result(self) -> tuple[list[int], list[bool]]:
        """(token a row, whether the row's logits were all finite), waiting for the device if need be."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            pairs = self._host.tolist()
            self._result = [token for token, _ in pairs], [bool(ok) for _, ok in pairs]
        return self._result


class BatchSampler:
    """The running batch's sampling state. Position ``i`` is batch row ``i``; rows being prefilled take the
    positions after the batch's (``place``) and keep them when they join; ``keep`` mirrors the batch's own
    compaction when rows leave."""

    def __init__(self, max_rows: int, vocab_size: int, eos_ids: Iterable[int], device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.temperature = torch.ones(max_rows, device=device)
        self.top_k = torch.full((max_rows,), vocab_size, dtype=torch.long, device=device)  # vocab: off
        self.top_p = torch.ones(max_rows, device=device)
        self.penalty = torch.ones(max_rows, device=device)
        self.eos_index = torch.tensor(sorted(i for i in eos_ids if 0 <= i < vocab_size), dtype=torch.long).to(device)
        # Tokens each penalised row has seen (prompt and generated): made when the first penalised row joins,
        # [max_rows, vocab] bools (256 x 128k = 32 MiB). Other rows' entries are never read (a penalty of 1
        # leaves every score as it is).
        self.seen: torch.Tensor | None = None
        self.rows: list[RowSampler | None] = [None] * max_rows  # host side: generators and what to skip

    # ------------------------------------------------------------------ rows joining and leaving

    def place(self, first: int, rows: Sequence[RowSampler], prompts: Sequence[list[int]]) -> None:
        """Rows about to be prefilled take positions ``first ..``: a few small host->device copies."""
        end = first + len(rows)
        if end > len(self.rows):
            raise RuntimeError(f"{end} sampler rows asked of {len(self.rows)}")
        self.rows[first:end] = rows
        columns = [(self.temperature, [r.temperature for r in rows]), (self.top_p, [r.top_p for r in rows]),
                   (self.penalty, [r.penalty for r in rows]),
                   (self.top_k, [min(r.top_k, self.vocab_size) or self.vocab_size for r in rows])]
        for tensor, column in columns:
            tensor[first:end] = self._on_device(column, tensor.dtype)
        for position, (row, prompt) in enumerate(zip(rows, prompts, strict=True), start=first):
            if row.penalised:
                self._see_prompt(position, prompt)

    def _see_prompt(self, position: int, prompt: list[int]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool, device=self.device)
        self.seen[position] = False
        ids = [i for i in prompt if 0 <= i < self.vocab_size]  # an id past the logits has no score to penalise
        self.seen[position, self._on_device(ids, torch.long)] = True

    def keep(self, order: list[int]) -> None:
        """The batch now holds, at position j, the row that was at ``order[j]``."""
        n = len(order)
        if order != list(range(n)):
            index = self._on_device(order, torch.long)
            for tensor in self._per_row():
                tensor[:n] = tensor.index_select(0, index)
            self.rows[:n] = [self.rows[i] for i in order]
        self.rows[n:] = [None] * (len(self.rows) - n)  # their generators go with them

    def _per_row(self) -> list[torch.Tensor]:
        tensors = [self.temperature, self.top_k, self.top_p, self.penalty]
        return tensors + ([self.seen] if self.seen is not None else [])

    # ------------------------------------------------------------------ one step

    def eos_bans(self, first: int, n: int) -> list[int]:
        """For the rows at positions ``first .. first + n``: 1 where the next token may not be an end-of-sequence
        id (``RowSampler.eos_banned``), else 0; the decode step's greedy pick takes them (``launch``)."""
        return [int(r is not None and r.eos_banned) for r in self.rows[first:first + n]]

    def sample(self, first: int, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """The next token of the rows at positions ``first ..`` (-1 where that row's sampling raised: it
        ends alone) and whether each row's logits were all finite. One device->host copy for the batch."""
        return self.launch(first, logits).result()

    def launch(self, first: int, logits: torch.Tensor, greedy: torch.Tensor | None = None) -> SampledTokens:
        """``sample`` without waiting: the tokens are chosen on the device and their copy to the host is
        queued; ``result()`` waits for it. Meanwhile the device tokens can feed the next step's forward.
        ``greedy``: ``sampling_ops.greedy_pick(logits, bans, eos)``, already computed (inside the decode step's
        graph) with ``bans`` from ``eos_bans`` just before this launch and every end-of-sequence id: where every
        row is greedy without a penalty (``picked_in_step``), those are the tokens, and nothing is launched but
        the copy (seen ids are read only for penalised rows, so they are left as they are)."""
        placed = self.rows[first:first + logits.shape[0]]
        if greedy is not None and all(r is not None and r.picked_in_step for r in placed):
            for row in placed:
                row.chosen += 1
            return SampledTokens(greedy[:, 0], pairs=greedy)
        finite = torch.isfinite(logits).all(-1) if greedy is None else greedy[:, 1]  # the step's check, not again
        try:
            tokens = self.choose(first, logits)
        except Exception as exc:
            if is_device_failure(exc, logits.device):
                raise
            log.warning("batched sampling failed; sampling its rows one by one", exc_info=exc)
            tokens = self._one_by_one(first, logits)
        return SampledTokens(tokens, finite)

    def _one_by_one(self, first: int, logits: torch.Tensor) -> torch.Tensor:
        """After a batched failure: each row alone, so that only the row that raises again fails (-1)."""
        tokens = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
        for i in range(logits.shape[0]):
            try:
                tokens[i] = self.choose(first + i, logits[i:i + 1])[0]
            except Exception as exc:
                if is_device_failure(exc, logits.device):
                    raise
                log.warning("sampling failed for batch row %d", first + i, exc_info=exc)
        return tokens

    def choose(self, first: int, logits: torch.Tensor) -> torch.Tensor:
        """The tokens of rows ``first ..`` as a device tensor (no host sync); records them as chosen.

        Each stage runs on the rows that need it only (which rows is known on the host, so selecting them
        costs no sync): the float copy and the penalty, then temperature, top-k / top-p and the draw."""
        end = first + logits.shape[0]
        rows = self._rows(first, end)
        plain = all(r.plain for r in rows)
        scores = logits if plain else self.processed_scores(first, logits)  # plain greedy: the logits as they are
        tokens = scores.argmax(-1)  # greedy rows' answer, and a sampled row's if its distribution is empty
        picked = self._where(rows, lambda r: r.sampled)
        if picked is not None:
            drawn = self._draw(picked + first, scores.index_select(0, picked), [r for r in rows if r.sampled])
            tokens = tokens.index_copy(0, picked, torch.where(drawn >= 0, drawn, tokens.index_select(0, picked)))
        # Recorded last, once nothing above can raise: a batch retried row by row counts each row once.
        for row in rows:
            row.chosen += 1
        if self.seen is not None:
            self.seen[first:end].scatter_(-1, tokens[:, None], True)
        return tokens

    def _draw(self, positions: torch.Tensor, scores: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
        """Temperature, top-k / top-p and the draw for sampled ``rows`` (at ``positions``, with these
        ``scores``); -1 for a row whose distribution is empty."""
        scores = shift_and_scale(scores, self.temperature.index_select(0, positions))
        filtered = self._where(rows, lambda r: r.filtered)
        if filtered is not None:
            at = positions.index_select(0, filtered)
            ks = [r.top_k for r in rows if r.filtered]
            largest_k = max(ks) if all(0 < k < self.vocab_size for k in ks) else None  # else a full sort
            scores = scores.index_copy(0, filtered, filter_top_k_top_p(
                scores.index_select(0, filtered), self.top_k.index_select(0, at), self.top_p.index_select(0, at),
                largest_k))
        return draw(scores, [r.generator for r in rows])

    def processed_scores(self, first: int, logits: torch.Tensor) -> torch.Tensor:
        """float32 scores of rows ``first ..`` after the minimum length (EOS at -inf below it) and the
        repetition penalty: what greedy rows take the argmax of, and what sampled rows sample from."""
        end = first + logits.shape[0]
        rows = self._rows(first, end)
        scores = logits.to(torch.float32, copy=True)
        if self.eos_index.numel() and any(r.eos_banned for r in rows):
            short = self._on_device([r is not None and r.eos_banned for r in self.rows[first:end]], torch.bool)
            ban_eos_(scores, short, self.eos_index)  # only EOS columns are touched
        penalised = self._where(rows, lambda r: r.penalised)
        if penalised is not None and self.seen is not None:
            at = penalised + first
            scores = scores.index_copy(0, penalised, apply_repetition_penalty(
                scores.index_select(0, penalised), self.seen.index_select(0, at), self.penalty.index_select(0, at)))
        return scores

    def _where(self, rows: list[RowSampler], wanted: Callable[[RowSampler], bool]) -> torch.Tensor | None:
        """The indices of ``rows`` that are ``wanted``, on the device; None if none is."""
        which = [i for i, r in enumerate(rows) if wanted(r)]
        return self._on_device(which, torch.long) if which else None

    def _on_device(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """A small host list as a device tensor, with no host sync: a blocking copy to a GPU waits for all
        the work queued before it (the forward whose logits are being sampled); one from page-locked memory
        is queued behind it instead (the pinned block is kept until the copy is done)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _rows(self, first: int, end: int) -> list[RowSampler]:
        rows = [r for r in self.rows[first:end] if r is not None]
        if len(rows) != end - first:
            raise RuntimeError(f"sampler positions {first}..{end - 1} hold no placed row")
        return rows
