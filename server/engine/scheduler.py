"""Admission: which waiting requests join the batch at this step, as a pure function of plain data.

The engine describes each waiting request (its prompt length with any virtual tokens, its LoRA adapter) and
what it has free (rows, the prefill budget, LoRA slots); ``schedule`` answers which requests to admit and
which adapters need a slot of their own. The engine then acquires the slots and prefills the admitted rows.

Rules, checked in arrival order:

- **Rows.** ``running + admitted <= max_batch_size``; when the rows are full the scan ends.
- **Prefill budget.** Admitted prompts are prefilled together, each padded to the longest, so the padded
  area ``rows x longest prompt`` stays within ``max_prefill_tokens``: one long prompt never joins a prefill
  of many short ones. The first admitted request always fits (alone it is prefilled whatever its length).
- **LoRA slots.** A LoRA request whose adapter already holds a pinned slot (a running row uses it) shares
  that slot; any other needs one of the ``open_slots`` (free, or holding an adapter no running row uses),
  one per distinct adapter. With that many open slots the engine's acquisitions cannot fail.
- **No head-of-line blocking.** A request that breaks a rule is skipped, and the scan goes on: a base
  request is not held behind a LoRA request waiting for a slot.
- **Fairness.** A skipped request counts the steps in which a request behind it was admitted
  (``Candidate.passed_over``). Once that count reaches ``patience`` the request is *overdue*, and an
  overdue request reserves what it lacks:

  - lacking a LoRA slot: no later LoRA request for another adapter is admitted before it (they would take
    the slot it waits for, or keep a slot pinned longer), while base and prefix requests still go ahead;
  - lacking prefill budget: nothing later is admitted at this step, so it heads the next prefill.

  So after ``patience`` overtakes, only requests that do not compete with it can pass it; the rows that pin
  the slots finish (each within its own token limit), nothing new pins a slot for another adapter, and the
  first slot that opens is the overdue request's (earlier requests aside, which are served first anyway).
  Bound: once overdue, a request waits at most (requests then ahead of it + 2) x the longest run of a row
  (tests/server/engine/test_scheduler.py checks it over simulated traffic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

# Steps in which later requests may overtake a skipped one before it is overdue. Small, so that a request
# for a cold adapter is soon served (see the bound above); not 0, so that one request waiting for a slot does
# not at once hold back every other adapter's requests.
PATIENCE = 4


class Candidate(NamedTuple):
    """One waiting request, as admission sees it (a named tuple: the engine builds one per waiting request
    at every step, three times faster than a frozen dataclass: ~70 us for 256 of them on one core)."""

    cost: int  # prompt tokens including a prefix adapter's virtual tokens (its padded prefill width)
    lora_key: str | None  # the LoRA adapter it needs a slot for; None for base and prefix requests
    passed_over: int = 0  # steps in which a later request was admitted while this one waited


class Limits(Protocol):
    """The configured limits admission reads (the engine's EngineConfig)."""

    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_prefill_tokens(self) -> int: ...
    @property
    def lora_slots(self) -> int: ...


@dataclass(frozen=True)
class Capacity:
    """What the engine has for new rows at this step."""

    running: int  # rows in the batch
    max_batch_size: int
    max_prefill_tokens: int  # budget of one prefill's padded area (rows x longest prompt, in tokens)
    pinned: frozenset[str]  # LoRA adapters in a slot that a running row uses (admitting more costs no slot)
    open_slots: int  # slots that can take another adapter: free, or holding one no running row uses

    @classmethod
    def of(cls, running_keys: Sequence[str | None], limits: Limits) -> Capacity:
        """From the LoRA adapter of each running row (None: base or prefix): every slot in use is pinned by
        the running rows of its adapter, and every other slot is open."""
        pinned = frozenset(k for k in running_keys if k is not None)
        return cls(len(running_keys), limits.max_batch_size, limits.max_prefill_tokens, pinned,
                   limits.lora_slots - len(pinned))


@dataclass(frozen=True)
class Plan:
    """The answer of one step; indices are into the ``waiting`` sequence, in arrival order."""

    admit: tuple[int, ...] = ()
    activate: tuple[str, ...] = ()  # adapters that take an open slot, in order of first admission
    passed_over: tuple[int, ...] = ()  # skipped requests with an admitted request behind them


class _Step:
    """The state of one scan: what has been admitted so far and what is reserved."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.admit: list[int] = []
        self.activate: list[str] = []
        self.longest = 0  # tokens of the longest admitted prompt
        self.reserved_for: str | None = None  # the adapter an overdue request waits for a slot for

    def rows_left(self) -> int:
        return self.capacity.max_batch_size - self.capacity.running - len(self.admit)

    def fits_budget(self, cost: int) -> bool:
        return not self.admit or (len(self.admit) + 1) * max(self.longest, cost) <= self.capacity.max_prefill_tokens

    def has_slot(self, key: str | None) -> bool:
        if key is None or key in self.capacity.pinned or key in self.activate:
            return True
        return len(self.activate) < self.capacity.open_slots

    def held_back(self, key: str | None) -> bool:
        """Fairness: a LoRA request behind an overdue one that waits for a slot for another adapter."""
        return key is not None and self.reserved_for is not None and key != self.reserved_for

    def take(self, index: int, candidate: Candidate) -> None:
        self.admit.append(index)
        self.longest = max(self.longest, candidate.cost)
        key = candidate.lora_key
        if key is not None and key not in self.capacity.pinned and key not in self.activate:
            self.activate.append(key)


def schedule(waiting: Sequence[Candidate], capacity: Capacity, patience: int = PATIENCE) -> Plan:
    """The requests to admit at this step (see the module's docstring for the rules)."""
    step = _Step(capacity)
    for index, candidate in enumerate(waiting):
        if step.rows_left() <= 0:
            break
        overdue = candidate.passed_over >= patience
        if step.held_back(candidate.lora_key):
            continue
        if not step.fits_budget(candidate.cost):
            if overdue:
                break  # it heads the next prefill: nothing behind it joins this one
            continue
        if not step.has_slot(candidate.lora_key):
            if overdue and step.reserved_for is None:
                step.reserved_for = candidate.lora_key
            continue
        step.take(index, candidate)
    last = step.admit[-1] if step.admit else -1
    admitted = set(step.admit)
    passed = tuple(i for i in range(last) if i not in admitted)
    return Plan(admit=tuple(step.admit), activate=tuple(step.activate), passed_over=passed)
