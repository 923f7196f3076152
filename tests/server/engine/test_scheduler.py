"""The scheduler alone: a pure function of plain data, so its rules are checked over many generated cases."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from adapterd.server.engine.scheduler import PATIENCE, Candidate, Capacity, Plan, schedule

KEYS = ["a", "b", "c", "d"]

candidates = st.builds(Candidate, cost=st.integers(1, 64), lora_key=st.sampled_from([None, *KEYS]),
                       passed_over=st.integers(0, PATIENCE + 2))


@st.composite
def capacities(draw) -> Capacity:
    max_batch = draw(st.integers(1, 8))
    slots = draw(st.integers(1, 4))
    pinned = frozenset(draw(st.lists(st.sampled_from(KEYS), max_size=slots, unique=True)))
    return Capacity(running=draw(st.integers(0, max_batch)), max_batch_size=max_batch,
                    max_prefill_tokens=draw(st.integers(1, 160)), pinned=pinned, open_slots=slots - len(pinned))


def _fits(plan_so_far: list[Candidate], candidate: Candidate, capacity: Capacity) -> bool:
    """Whether ``candidate`` could join ``plan_so_far`` (rows, budget, slots): the rules restated plainly."""
    together = [*plan_so_far, candidate]
    rows = capacity.running + len(together) <= capacity.max_batch_size
    budget = len(together) == 1 or len(together) * max(c.cost for c in together) <= capacity.max_prefill_tokens
    new_keys = {c.lora_key for c in together if c.lora_key is not None} - capacity.pinned
    return rows and budget and len(new_keys) <= capacity.open_slots


@settings(max_examples=400, deadline=None)
@given(st.lists(candidates, max_size=12), capacities())
def test_a_plan_keeps_every_limit(waiting, capacity):
    plan = schedule(waiting, capacity)
    admitted = [waiting[i] for i in plan.admit]
    assert list(plan.admit) == sorted(set(plan.admit))  # arrival order, each once
    assert capacity.running + len(admitted) <= capacity.max_batch_size
    if len(admitted) > 1:
        assert len(admitted) * max(c.cost for c in admitted) <= capacity.max_prefill_tokens
    # Never a LoRA request without a slot: shared with a running row, or one of the open slots.
    new_keys = [k for k in dict.fromkeys(c.lora_key for c in admitted) if k is not None and k not in capacity.pinned]
    assert list(plan.activate) == new_keys
    assert len(new_keys) <= capacity.open_slots


@settings(max_examples=400, deadline=None)
@given(st.lists(candidates, max_size=12), capacities())
def test_no_head_of_line_blocking(waiting, capacity):
    """Arrival order holds among admissible requests, and only among them: a request left out did not fit beside
    the ones admitted before it (fairness aside: nobody is overdue here)."""
    plan = schedule(waiting, capacity, patience=10**9)
    before: list[Candidate] = []
    for i, candidate in enumerate(waiting):
        if i in plan.admit:
            before.append(candidate)
        else:
            assert not _fits(before, candidate, capacity), f"request {i} could have joined"


@settings(max_examples=400, deadline=None)
@given(st.lists(candidates, max_size=12), capacities())
def test_an_overdue_request_is_passed_only_by_requests_that_do_not_compete(waiting, capacity):
    """The first overdue request left out keeps what it lacks: after it come only base and prefix requests (no
    slot) and requests for its own adapter (its slot, once it has one); none at all if it lacked budget."""
    plan = schedule(waiting, capacity)
    left_out = [i for i, c in enumerate(waiting) if c.passed_over >= PATIENCE and i not in plan.admit]
    if not left_out:
        return
    first = waiting[left_out[0]]
    after = [waiting[j] for j in plan.admit if j > left_out[0]]
    assert all(c.lora_key in (None, first.lora_key) for c in after)
    if not _fits([waiting[j] for j in plan.admit if j < left_out[0]], first, _without_slots_limit(capacity)):
        assert after == []  # it lacked rows or budget, not a slot: nothing passes it


def _without_slots_limit(capacity: Capacity) -> Capacity:
    return Capacity(capacity.running, capacity.max_batch_size, capacity.max_prefill_tokens, frozenset(KEYS), 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(candidates, max_size=12), capacities())
def test_passed_over_counts_requests_overtaken(waiting, capacity):
    plan = schedule(waiting, capacity)
    last = max(plan.admit, default=-1)
    assert set(plan.passed_over) == {i for i in range(last) if i not in plan.admit}


def test_a_base_request_goes_ahead_of_a_lora_request_waiting_for_a_slot():
    """The issue's case: one slot, pinned by a running row of adapter a; b waits for a slot; the base request
    behind it takes one of the idle rows."""
    capacity = Capacity(running=1, max_batch_size=4, max_prefill_tokens=4096, pinned=frozenset({"a"}), open_slots=0)
    assert schedule([Candidate(8, "b"), Candidate(8, None)], capacity) == Plan(admit=(1,), passed_over=(0,))


def test_a_long_prompt_is_skipped_not_waited_for():
    """The padded budget still keeps a long prompt out of a prefill of short ones, without stopping the queue:
    the short prompts behind it join; the long one heads the next prefill."""
    capacity = Capacity(running=0, max_batch_size=8, max_prefill_tokens=48, pinned=frozenset(), open_slots=1)
    plan = schedule([Candidate(4, None), Candidate(40, None), Candidate(5, None)], capacity)
    assert plan.admit == (0, 2)
    assert schedule([Candidate(40, None, passed_over=1), Candidate(5, None)], capacity).admit == (0,)
    overdue = Candidate(40, None, passed_over=PATIENCE)
    assert schedule([Candidate(4, None), overdue, Candidate(5, None)], capacity).admit == (0,)


def _simulate(patience: int, steps: int, run_for: int) -> int | None:
    """One slot, four rows. Adapter a gets a new request every step, each running ``run_for`` steps; one request
    for adapter b arrives at step 1. Returns the step b is admitted at (None: never)."""
    running: list[tuple[str | None, int]] = []  # (adapter, steps left)
    waiting: list[tuple[str, Candidate]] = []
    for step in range(steps):
        running = [(k, left - 1) for k, left in running if left > 1]
        waiting.append((f"a{step}", Candidate(8, "a")))
        if step == 1:
            waiting.append(("b", Candidate(8, "b")))
        pinned = frozenset(k for k, _ in running if k is not None)
        plan = schedule([c for _, c in waiting], Capacity(len(running), 4, 4096, pinned, 1 - len(pinned)),
                        patience)
        for i in plan.passed_over:
            name, c = waiting[i]
            waiting[i] = (name, Candidate(c.cost, c.lora_key, c.passed_over + 1))
        names = [waiting[i][0] for i in plan.admit]
        if "b" in names:
            return step
        running += [(waiting[i][1].lora_key, run_for) for i in plan.admit]
        waiting = [w for i, w in enumerate(waiting) if i not in plan.admit]
    return None


def test_a_request_for_a_cold_adapter_is_not_starved():
    """Without fairness adapter a keeps the one slot pinned for ever; with it, b gets the slot once the rows
    running when it became overdue finish: within patience overtakes plus one run of a row (and a row's wait)."""
    assert _simulate(patience=10**9, steps=200, run_for=5) is None
    admitted_at = _simulate(patience=PATIENCE, steps=200, run_for=5)
    assert admitted_at is not None and admitted_at <= 1 + PATIENCE + 2 * 5


@dataclass(frozen=True)
class _Limits:
    max_batch_size: int
    max_prefill_tokens: int
    lora_slots: int


RUN_MAX = 6  # steps a simulated row runs at most
traffic = st.lists(st.lists(st.tuples(st.sampled_from([None, "a", "a", "a", "b", "c"]), st.integers(1, RUN_MAX)),
                            max_size=3), min_size=10, max_size=60)


def _overdue_waits(arrivals, rows: int, slots: int, patience: int = PATIENCE) -> list[tuple[int, int]]:
    """Simulate the engine's loop over ``arrivals`` (per step: (adapter, steps it runs) of each new request).
    For each step that a request spends waiting after it became overdue: (steps since then, requests that
    were ahead of it then)."""
    running: list[tuple[str | None, int]] = []  # (adapter, steps left)
    waiting: list[dict] = []
    waits = []
    for step, new in enumerate(arrivals):
        running = [(k, left - 1) for k, left in running if left > 1]
        waiting += [{"key": key, "run": run, "passed": 0, "overdue": None} for key, run in new]
        capacity = Capacity.of([k for k, _ in running], _Limits(rows, 10**6, slots))
        plan = schedule([Candidate(8, w["key"], w["passed"]) for w in waiting], capacity, patience)
        for i in plan.passed_over:
            waiting[i]["passed"] += 1
            if waiting[i]["passed"] == patience:
                waiting[i]["overdue"] = (step, i)
        running += [(waiting[i]["key"], waiting[i]["run"]) for i in plan.admit]
        waiting = [w for i, w in enumerate(waiting) if i not in plan.admit]
        waits += [(step - w["overdue"][0], w["overdue"][1]) for w in waiting if w["overdue"] is not None]
    return waits


@settings(max_examples=150, deadline=None)
@given(traffic, st.integers(1, 4), st.integers(1, 3))
def test_an_overdue_request_waits_at_most_for_those_ahead_of_it(arrivals, rows, slots):
    """The fairness bound: once overdue, a request waits at most for the requests then ahead of it and the
    rows then running, one row's run each ((ahead + 2) x the longest run). Without the rule (patience
    infinite) traffic that breaks this bound exists: adapter a's requests keep its slot pinned (as in
    test_a_request_for_a_cold_adapter_is_not_starved; hypothesis finds such traffic within a few hundred
    examples)."""
    for waited, ahead in _overdue_waits(arrivals, rows, slots):
        assert waited <= (ahead + 2) * RUN_MAX
