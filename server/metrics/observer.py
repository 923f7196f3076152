"""The engine observer that feeds the request metrics. Every hook runs on the engine thread between model
calls, so each does a few dictionary lookups and histogram observations and nothing that can block.

Times are ``time.monotonic()`` seconds, the clock ``Row.submitted`` and ``Row.admitted`` use.
"""

from __future__ import annotations

import time

from ..engine.batch import Row
from ..engine.observer import EngineObserver
from ..engine.request import StopReason
from .definitions import Metrics
from .labels import AdapterLabels

# Rows that ended early for reasons of their own tell nothing about decode speed.
_NO_TPOT = (StopReason.CANCELLED, StopReason.ERROR)
# StopReason -> finished_reason label value (bounded: the enum's members).
_REASONS: dict[int, str] = {}


def _reason(row: Row) -> str:
    value = int(row.finished)
    name = _REASONS.get(value)
    if name is None:
        name = _REASONS[value] = row.finished.name.lower()
    return name


class MetricsObserver(EngineObserver):
    """Queue time, time to first token, time per output token, end-to-end latency, token counts, batch
    size, and finished requests by adapter and reason."""

    def __init__(self, metrics: Metrics, labels: AdapterLabels) -> None:
        self.m = metrics
        self.labels = labels
        self._first_token: dict[int, float] = {}  # id(row) -> monotonic time of its first token

    def request_admitted(self, row: Row, queue_seconds: float) -> None:
        self.m.queue_time.observe(queue_seconds)
        if row.adapter is not None:
            self.labels.record_use(row.adapter.adapter_id)

    def prefill_done(self, rows: list[Row], prompt_tokens: int) -> None:
        now = time.monotonic()
        self.m.prompt_tokens.inc(prompt_tokens)
        ttft = self.m.ttft
        first = self._first_token
        for row in rows:
            ttft.observe(now - row.submitted)
            first[id(row)] = now

    def decode_step(self, rows: list[Row], seconds: float) -> None:
        self.m.batch_size.observe(len(rows))

    def request_finished(self, row: Row) -> None:
        now = time.monotonic()
        m = self.m
        first = self._first_token.pop(id(row), None)
        generated = len(row.generated)
        # Tokens the model produced: the returned ones, plus the end-of-sequence token that ended the row.
        produced = generated + (row.finished == StopReason.EOS_TOKEN)
        if first is not None and produced >= 2 and row.finished not in _NO_TPOT:
            m.tpot.observe((now - first) / (produced - 1))
        m.e2e.observe(now - row.submitted)
        if generated:
            m.generation_tokens.inc(generated)
        adapter = self.labels.label(row.adapter.adapter_id if row.adapter is not None else None)
        m.finished.inc((adapter, _reason(row)))
