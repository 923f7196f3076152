"""Hooks through which the engine reports what it does, for metrics and tests. All are called on the
engine thread, so an observer must be quick and must not block; the default does nothing."""

from __future__ import annotations

from .batch import Row


class EngineObserver:
    def request_admitted(self, row: Row, queue_seconds: float) -> None:
        """``row`` left the queue for a batch row after ``queue_seconds``."""

    def prefill_launched(self, rows: list[Row]) -> None:
        """The runner has built and launched the prefill forward of ``rows`` (the device may still run it)."""

    def prefill_done(self, rows: list[Row], prompt_tokens: int) -> None:
        """Rows were prefilled together; each has its first token (time to first token)."""

    def decode_launched(self, rows: list[Row], seconds: float) -> None:
        """The runner returned the decode forward of ``rows`` after ``seconds`` of host work (inputs, the
        graph's replay or the eager launches); the device may still be running it."""

    def decode_step(self, rows: list[Row], seconds: float) -> None:
        """One decode step produced one token for each of ``rows`` in ``seconds``."""

    def request_finished(self, row: Row) -> None:
        """``row`` left the batch (finished, cancelled or failed); ``row.finished`` says why."""


class ObserverList(EngineObserver):
    """Fans each hook out to several observers."""

    def __init__(self) -> None:
        self.observers: list[EngineObserver] = []

    def add(self, observer: EngineObserver) -> None:
        self.observers.append(observer)

    def request_admitted(self, row: Row, queue_seconds: float) -> None:
        for o in self.observers:
            o.request_admitted(row, queue_seconds)

    def prefill_launched(self, rows: list[Row]) -> None:
        for o in self.observers:
            o.prefill_launched(rows)

    def prefill_done(self, rows: list[Row], prompt_tokens: int) -> None:
        for o in self.observers:
            o.prefill_done(rows, prompt_tokens)

    def decode_launched(self, rows: list[Row], seconds: float) -> None:
        for o in self.observers:
            o.decode_launched(rows, seconds)

    def decode_step(self, rows: list[Row], seconds: float) -> None:
        for o in self.observers:
            o.decode_step(rows, seconds)

    def request_finished(self, row: Row) -> None:
        for o in self.observers:
            o.request_finished(row)
