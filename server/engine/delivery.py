"""A step's tokens reaching their rows, and the decode step kept in flight while the host reads the one before.

``hand_out`` is what a sampled token does to its row: the row ends alone if its logits were not all finite (its
adapter overflowed, say) or its sampling raised; an end-of-sequence token past the minimum length ends it; else
the token is the row's, streamed unless it reached a length limit. Token ids only: text and stop sequences are
the output stage's (output.py).

``StepInFlight``: while the batch is steady (nobody joins, nothing ends by length, no cancellation), the engine
launches decode step N+1, fed with step N's tokens straight from the device, before it reads step N's tokens.
The host's work between two steps (reading tokens, events, bookkeeping, the next launch) then overlaps the
device's forward instead of leaving the device idle (vLLM's async scheduling, SGLang's overlap scheduler do
the same). A row that step N ends by its token (end of sequence, non-finite logits, failed sampling) has run
one step too many: that step's token is dropped, and the pool row it wrote is zeroed when it leaves, as any
leaving row's is (kv_pool.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import AdapterdError, FailedPrecondition, InvalidArgument
from .batch import Row
from .failures import nonfinite_message
from .request import GenerationEvent, StopReason
from .sampling import SampledTokens

log = logging.getLogger(__name__)


@dataclass
class StepInFlight:
    """A decode step whose forward and sampling are queued on the device, its tokens not yet read."""

    rows: list[Row]  # the batch's rows when launched, in batch order
    sampled: SampledTokens
    started: float  # perf_counter at launch


def may_run_ahead(rows: list[Row], max_sequence_length: int) -> bool:
    """Whether the step after this one may be launched before this one's tokens are read: no row has ended,
    and none ends by length at this step's token (rows that do leave at once)."""
    return all(r.finished == StopReason.NOT_FINISHED and len(r.generated) + 1 < r.params.max_new_tokens
               and r.next_position + 1 < max_sequence_length for r in rows)


def hand_out(rows: list[Row], sampled: tuple[list[int], list[bool]], eos_ids: frozenset[int] | set[int],
             max_sequence_length: int, launched_since: int = 0) -> None:
    """Each going row's token (rows that ended before are skipped). ``launched_since``: decode steps launched
    after the one these tokens are from, by which the rows' positions have advanced already (so the limit
    their next position is held to moves up by as many)."""
    for row, token, ok in zip(rows, *sampled, strict=True):
        if row.finished != StopReason.NOT_FINISHED:
            continue
        if not ok:
            adapter_id = row.adapter.adapter_id if row.adapter is not None else None
            end_alone(row, FailedPrecondition(nonfinite_message(adapter_id)))
        elif token < 0:
            end_alone(row, InvalidArgument("sampling failed with these parameters", field="sampling"))
        else:
            accept(row, token, eos_ids, max_sequence_length + launched_since)


def end_alone(row: Row, error: AdapterdError) -> None:
    """This row's own data failed: it ends with ERROR and ``error``; the batch goes on."""
    log.warning("request %s ended alone: %s", row.request_id, error)
    row.finished = StopReason.ERROR
    row.error = error


def accept(row: Row, token: int, eos_ids: frozenset[int] | set[int], position_limit: int) -> None:
    """``token`` is the row's next; it ends the row at an end of sequence (past the minimum length), at
    ``max_new_tokens``, or when the row's next position reaches ``position_limit`` (virtual tokens count)."""
    params = row.params
    row.last_token = token
    if token in eos_ids and len(row.generated) >= params.min_new_tokens:
        row.finished = StopReason.EOS_TOKEN
        return
    row.generated.append(token)
    if len(row.generated) >= params.max_new_tokens:
        row.finished = StopReason.MAX_TOKENS
    elif row.next_position + 1 >= position_limit:
        row.finished = StopReason.TOKEN_LIMIT
    else:
        row.emit(GenerationEvent("delta", generated_token_count=len(row.generated), token_ids=[token]))
