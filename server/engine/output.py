"""The output stage: one request's token events in, the text events its caller reads out.

The engine (scheduler, runner, sampler) deals in token ids only; turning them into text and finding stop
sequences happens here, where the events are consumed: in the gRPC front end, never on the engine's thread
(as vLLM's ``OutputProcessor`` does). A stop sequence found here ends the request for its caller at once; the
caller then cancels the engine's row, which may have run a step further (its tokens are never shown).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from .request import GenerationEvent, GenerationParams, StopReason
from .text import TextStream


class RequestOutput:
    """Detokenizes one request's tokens as they come and applies its stop sequences."""

    def __init__(self, tokenizer: Any, params: GenerationParams) -> None:
        self.text = TextStream(tokenizer, params.stop_sequences, params.include_stop_sequence)
        self.generated: list[int] = []
        self.done = False

    def _add(self, token_ids: list[int]) -> bool:
        """Take new tokens; True when one of them completed a stop sequence (later ones are dropped)."""
        for token in token_ids:
            self.generated.append(token)
            self.text.add(token)
            if self.text.stopped_by:
                return True
        return False

    def process(self, event: GenerationEvent) -> GenerationEvent | None:
        """The caller's event for the engine's ``event``; None once the request has ended for the caller."""
        if self.done:
            return None
        if event.kind == "start":
            return event
        if event.kind == "delta":
            if self._add(event.token_ids):
                return self._end(StopReason.STOP_SEQUENCE, None)
            return GenerationEvent("delta", text=self.text.take(), generated_token_count=len(self.generated),
                                   token_ids=list(event.token_ids))
        # "end" carries every generated id: those not seen in a delta (the last one, when the length limit
        # ended the row) are added here.
        if self._add(event.token_ids[len(self.generated):]):
            return self._end(StopReason.STOP_SEQUENCE, None)
        return self._end(event.stop_reason, event.error)

    def _end(self, reason: StopReason, error: Exception | None) -> GenerationEvent:
        self.done = True
        return GenerationEvent("end", text=self.text.take(final=True), generated_token_count=len(self.generated),
                               stop_reason=reason, stop_sequence=self.text.stopped_by,
                               token_ids=list(self.generated), error=error)


async def text_events(events: asyncio.Queue[GenerationEvent], output: RequestOutput,
                      cancel: Callable[[], None]) -> AsyncIterator[GenerationEvent]:
    """Yield the caller's events for the engine events arriving on ``events`` until "end".

    A reader that fell behind gets the token deltas waiting for it as one event (one detokenization, one
    message). Leaving early, or a stop sequence, cancels the engine's row through ``cancel``."""
    engine_ended = False
    held: GenerationEvent | None = None
    try:
        while not output.done:
            event = held or await events.get()
            held = None
            while event.kind == "delta" and not events.empty():
                following = events.get_nowait()
                if following.kind != "delta":
                    held = following
                    break
                event = event.followed_by(following)
            engine_ended = event.kind == "end"
            shown = output.process(event)
            if shown is not None:
                yield shown
    finally:
        if not engine_ended:
            cancel()
