"""How the engine spends its steps: decode steps and prefill forwards, their rows and their time.

The same counter runs beside the engine driven in-process and inside the engine core (the core's ``steps``
call), so ``bench/load_bench.py`` compares the two like with like: a step is one decode forward of the
running batch; a prefill is one forward over the prompts admitted together. Over gRPC, requests arrive
spread over time, so the same tokens can cost more prefill forwards with fewer rows each.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import msgspec

from ..engine.batch import Row
from ..engine.observer import EngineObserver

BUSY_GAP_S = 0.5  # decode steps further apart than this had an idle engine between them: not counted as busy
RECENT_PREFILLS = 1024  # prefill times kept one by one (``prefill_times``): a TTFT run's requests and more


class StepCounts(msgspec.Struct):
    """Totals since the counter started; seconds are wall time on the engine thread."""

    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0
    prefills: int = 0
    prefill_rows: int = 0
    prefill_seconds: float = 0.0  # from the last row's admission to its first tokens: forward and sampling
    prefill_launch_seconds: float = 0.0  # of which until the runner returned: host work and launches
    decode_launch_seconds: float = 0.0  # of decode_seconds, until the runner returned: host work and launches
    # Between consecutive decode steps less than BUSY_GAP_S apart: wall time, and the engine thread's CPU time
    # (time.thread_time) in it. A waiting GPU is CPU time too (CUDA's spin-wait on a host copy), so CPU
    # short of wall is the engine thread off a core: waiting for the GIL, or descheduled. Under a light load
    # the engine also idles between steps (waiting for requests) in gaps under BUSY_GAP_S: read the share
    # under a steady load only (load_bench's streams), not in the Zipf sweep's lines.
    busy_wall_seconds: float = 0.0
    busy_cpu_seconds: float = 0.0
    graph_captures: int = 0  # CUDA graphs captured (a new shape, or every graph after the pool moved)
    capture_seconds: float = 0.0  # the engine thread's time capturing them: no step runs meanwhile

    def minus(self, before: StepCounts) -> StepCounts:
        return StepCounts(*(getattr(self, f) - getattr(before, f) for f in self.__struct_fields__))

    def describe(self, span: float) -> str:
        """One line for a phase of ``span`` seconds (the counts being that phase's: ``after.minus(before)``)."""
        if not self.decode_steps:
            return "no decode steps"
        steps, prefills = self.decode_steps, self.prefills
        line = (f"{steps} decode steps ({span / steps * 1000:.2f} ms apart), {self.decode_rows / steps:.1f} rows "
                f"and {self.decode_seconds / steps * 1000:.2f} ms each")
        if prefills:
            line += (f"; {prefills} prefills ({prefills / steps:.2f} per decode step), "
                     f"{self.prefill_rows / prefills:.1f} rows and "
                     f"{self.prefill_seconds / prefills * 1000:.2f} ms each "
                     f"({self.prefill_launch_seconds / prefills * 1000:.2f} ms of it to build and launch)")
        if self.graph_captures:
            line += f"; {self.graph_captures} graph captures ({self.capture_seconds * 1000:.0f} ms)"
        if self.busy_wall_seconds > 0:
            line += (f"; decode launch {self.decode_launch_seconds / steps * 1000:.2f} ms a step; engine thread "
                     f"on a CPU {self.busy_cpu_seconds / self.busy_wall_seconds:.0%} of the time")
        return line


class StepCounter(EngineObserver):
    """Counts on the engine thread (its hooks); ``counts`` may be read from any thread (a copy)."""

    def __init__(self, graph_captures: Callable[[], tuple[int, float]] | None = None) -> None:
        self._counts = StepCounts()
        self._graph_captures = graph_captures  # the runner's (count, seconds) so far, when there is one
        self._admitted_at = 0.0  # perf_counter() of the latest admission: the prefill that follows starts here
        self._last_step: tuple[float, float] | None = None  # (perf_counter, thread_time) at the last decode step
        self._prefill_times: deque[float] = deque(maxlen=RECENT_PREFILLS)  # seconds, oldest first

    def counts(self) -> StepCounts:
        counts = StepCounts(**msgspec.structs.asdict(self._counts))
        if self._graph_captures is not None:
            counts.graph_captures, counts.capture_seconds = self._graph_captures()
        return counts

    def prefill_times(self, last: int = RECENT_PREFILLS) -> list[float]:
        """The seconds of the latest ``last`` prefills one by one (admission to first tokens), oldest first: a
        run of sequential requests' median, which a mean over ``counts`` blurs with a slow first one."""
        times = list(self._prefill_times)
        return times[-last:] if last > 0 else []

    def request_admitted(self, row: Row, queue_seconds: float) -> None:
        self._admitted_at = time.perf_counter()

    def prefill_launched(self, rows: list[Row]) -> None:
        # Host side of a prefill: admission to the runner's return (inputs, slots, the forward's launches). The
        # rest, to the first tokens, is mostly waiting for the device; a host-bound prefill shows up here.
        self._counts.prefill_launch_seconds += time.perf_counter() - self._admitted_at

    def prefill_done(self, rows: list[Row], prompt_tokens: int) -> None:
        c = self._counts
        c.prefills += 1
        c.prefill_rows += len(rows)
        seconds = time.perf_counter() - self._admitted_at
        c.prefill_seconds += seconds
        self._prefill_times.append(seconds)

    def decode_launched(self, rows: list[Row], seconds: float) -> None:
        self._counts.decode_launch_seconds += seconds

    def decode_step(self, rows: list[Row], seconds: float) -> None:
        c = self._counts
        c.decode_steps += 1
        c.decode_rows += len(rows)
        c.decode_seconds += seconds
        now = (time.perf_counter(), time.thread_time())
        if self._last_step is not None and now[0] - self._last_step[0] < BUSY_GAP_S:
            c.busy_wall_seconds += now[0] - self._last_step[0]
            c.busy_cpu_seconds += now[1] - self._last_step[1]
        self._last_step = now
