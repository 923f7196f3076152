"""Bounded ``adapter`` label values: the most used N adapter ids by name, every other adapter as "other".

Adapter ids come from clients and from the adapter root, so they are unbounded; a label that took them as
they come would give Prometheus one series per id ever seen. Here an id earns its own label value only by
being used (admitted to the engine, which happens only for adapters that loaded), and at most ``limit`` ids
hold one at a time. When an unnamed adapter has clearly overtaken the least used named one (more than 10%
more uses, plus one), it takes that one's place: the demoted adapter's series are removed (its future
requests count under "other"), so the number of series stays bounded however the traffic shifts.

Requests without an adapter are labelled ``"__base__"`` (PEFT's name for "no adapter"). An adapter whose id is
literally ``"other"`` or ``"__base__"`` never gets a label of its own; it counts under "other".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

BASE = "__base__"
OTHER = "other"
DEFAULT_LIMIT = 20
MAX_TRACKED_IDS = 10_000  # usage counts kept for at most this many ids (memory bound)


class AdapterLabels:
    """Decides the ``adapter`` label value of each adapter id. ``label`` may be called from any thread;
    ``record_use`` is called by the engine observer (one thread)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._uses: dict[str, int] = {}
        self._named: set[str] = set()
        self._lock = threading.Lock()
        self._on_demote: list[Callable[[str], None]] = []

    def on_demote(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(adapter_id)`` when an adapter loses its own label value."""
        self._on_demote.append(listener)

    def named(self) -> set[str]:
        """The adapter ids that currently have their own label value."""
        with self._lock:
            return set(self._named)

    def label(self, adapter_id: str | None) -> str:
        """The label value for ``adapter_id`` (empty or None: the base model). Never promotes."""
        if not adapter_id:
            return BASE
        return adapter_id if adapter_id in self._named else OTHER

    def record_use(self, adapter_id: str | None) -> None:
        """Count one use of a loaded adapter; it may take a label value of its own."""
        if not adapter_id or adapter_id in (OTHER, BASE):
            return
        demoted: str | None = None
        with self._lock:
            uses = self._uses.get(adapter_id)
            if uses is None and len(self._uses) >= MAX_TRACKED_IDS:
                return
            uses = (uses or 0) + 1
            self._uses[adapter_id] = uses
            if adapter_id in self._named:
                return
            if len(self._named) < self.limit:
                self._named.add(adapter_id)
                return
            if not self._named:
                return
            victim = min(self._named, key=self._uses.__getitem__)
            if uses <= self._uses[victim] * 1.1 + 1:
                return
            self._named.discard(victim)
            self._named.add(adapter_id)
            demoted = victim
        for listener in self._on_demote:
            listener(demoted)


class AdapterCounter:
    """A labelled Counter one of whose labels is ``adapter``; children are cached (a dict lookup per
    increment instead of ``labels()``) and all series of one adapter can be dropped at once."""

    def __init__(self, counter: Any, adapter_position: int) -> None:
        self.counter = counter
        self.adapter_position = adapter_position
        self._children: dict[tuple[str, ...], Any] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to the series with these label values (in the counter's label order)."""
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.counter.labels(*labels)
        child.inc(amount)

    def drop_adapter(self, adapter_id: str) -> None:
        """Remove every series whose adapter label is ``adapter_id``."""
        for key in list(self._children):
            if key[self.adapter_position] == adapter_id:
                self._children.pop(key, None)
                try:
                    self.counter.remove(*key)
                except KeyError:
                    pass
