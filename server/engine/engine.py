"""The engine: one thread that owns the model and runs the continuous batch.

Each turn of the loop: take new requests and control calls from the inbox, drop cancelled and timed-out
rows, admit waiting requests (scheduler.py picks them), prefill them together, then run one decode step for
every running row and hand each row's new token to its sink. A request joins at the next step and leaves the
moment it finishes. Nothing here knows about gRPC.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.store import LoadedAdapter
from ..errors import AdapterdError, ResourceExhausted, Unavailable
from ..model import BaseModel
from .batch import Row
from .delivery import StepInFlight, hand_out, may_run_ahead
from .failures import Breakage, is_device_failure
from .observer import ObserverList
from .profiling import StepProfiler
from .request import GenerationEvent, GenerationParams, StopReason
from .runner import ModelRunner
from .sampling import BatchSampler, RowSampler, logits_width
from .scheduler import Candidate, Capacity, schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # rows decoded together
    max_queue: int = 256  # requests waiting for a row before new ones get RESOURCE_EXHAUSTED
    lora_slots: int = 16  # LoRA adapters resident on the device at once
    max_lora_rank: int = 64
    max_prefill_tokens: int = 4096  # prompt tokens in one prefill, padding included, so running rows keep moving
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (on a CUDA device)
    int8_kernel: bool = True  # int8 base on a GPU: weight-only Triton matmul instead of bitsandbytes' own
    fused_kernels: bool = True  # on a GPU: Triton RMSNorm, decode rotary + KV append, BGMV LoRA decode kernels
    own_decoder: bool = True  # the engine's own decoder forward for the families decoder.py runs
    run_ahead: bool = True  # launch each decode step before reading the step before's tokens (delivery.py)
    step_tuning: bool = True  # on a GPU: the int8 GEMV's one-row tiles chosen by the decode step's own time


class Engine:
    def __init__(self, base: BaseModel, config: EngineConfig) -> None:
        self.base = base
        self.config = config
        self.runner = ModelRunner(base, config)  # slots, the key/value pool and batch, the forwards
        self.batch = self.runner.batch
        self.waiting: deque[Row] = deque()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._queued = 0  # submitted and not yet admitted (inbox + waiting)
        self._lock = threading.Lock()
        self._rows_by_id: dict[str, Row] = {}
        self._prefilling: list[Row] = []
        self._in_flight: StepInFlight | None = None
        self._delivered_at = 0.0  # perf_counter when the last decode step's tokens were handed out
        self.steps_run_ahead = 0  # decode steps launched before the previous step's tokens were read
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.eos_ids = base.eos_token_ids
        self.sampler = BatchSampler(config.max_batch_size, logits_width(base.model), self.eos_ids, base.device)
        self.observers = ObserverList()  # metrics and tests listen here
        profiler = StepProfiler.from_env()  # benches only: ADAPTERD_PROFILE_DIR (profiling.py)
        if profiler is not None:
            self.observers.add(profiler)
        self.breakage = Breakage()  # set when the device (or this thread) fails for good: health listens
        self.after_step: Callable[[], None] = lambda: None  # on this thread, once a step's events are all out

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="adapterd-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request_id: str, prompt_ids: list[int], params: GenerationParams,
               adapter: LoadedAdapter | None, sink: Callable[[GenerationEvent], None]) -> None:
        """Queue a request. Events reach ``sink`` on the engine thread: start, deltas, end; token ids only
        (text and stop sequences are the output stage's: output.py)."""
        if self.breakage.reason is not None:
            raise Unavailable("the engine cannot serve (the daemon is restarting); retry shortly")
        if self._stopping:
            raise Unavailable("the engine is shutting down")
        with self._lock:
            if self._queued >= self.config.max_queue:
                raise ResourceExhausted(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._queued += 1
        row = Row(request_id=request_id, prompt_ids=list(prompt_ids), params=params, adapter=adapter, sink=sink,
                  sampler=RowSampler(params, self.base.device))
        self._inbox.put(("submit", row))

    def cancel(self, request_id: str) -> None:
        """Free the request's row at the next step (client gone, deadline passed)."""
        self._inbox.put(("cancel", request_id))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (e.g. to change device-resident adapters)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def evict(self, adapter: LoadedAdapter) -> concurrent.futures.Future:
        """Free an unloaded adapter's slot now, or when the last row using it leaves."""
        return self.call(lambda: self.runner.evict(adapter.key))

    def stats(self) -> dict[str, int]:
        """Rows running, requests waiting, and LoRA slots pinned by a running row."""
        return {"running": len(self.batch), "waiting": self._queued, "pinned_slots": self.runner.slots.pinned()}

    # ------------------------------------------------------------------ the loop, engine thread

    def _loop(self) -> None:
        # Everything on this thread runs in inference mode: tensors it creates (the key/value pool when it
        # grows, LoRA tables of newly wrapped layers) are inference tensors, updated only here.
        try:
            with torch.inference_mode():
                self._run()
        except BaseException as exc:  # noqa: BLE001 - the thread is ending: nobody would ever answer again
            log.exception("the engine thread died")
            self._break(f"the engine thread died: {type(exc).__name__}")
            self._end_everything(release=False)
            self.after_step()

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox(block=not self.batch.rows and not self.waiting)
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not end the daemon
                if is_device_failure(exc, self.base.device):
                    log.error("engine step failed on the device", exc_info=exc)
                    self._break(f"device failure: {type(exc).__name__}")
                    break
                self._fail_all(exc)
            self.after_step()
        self._end_everything(release=self.breakage.reason is None)
        self.after_step()

    def _break(self, reason: str) -> None:
        """The device or this thread failed for good: refuse new work, tell the listeners (health)."""
        self._stopping = True
        self.breakage.set(reason)

    def _end_everything(self, release: bool) -> None:
        """The loop is over: end every row in flight and every waiting request with UNAVAILABLE."""
        self._drain_inbox(block=False)
        stopped = Unavailable("the engine stopped" if self.breakage.reason is None
                              else "the engine cannot serve (the daemon is restarting); retry shortly")
        self._fail_all(stopped, release=release)
        while self.waiting:
            row = self.waiting.popleft()
            row.emit(GenerationEvent("end", stop_reason=StopReason.ERROR, error=stopped))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self.waiting.append(payload)
                self._rows_by_id[payload.request_id] = payload
            elif kind == "cancel":
                row = self._rows_by_id.get(payload)
                if row is not None:
                    row.cancelled = True
            elif kind == "call":
                fn, future = payload
                self._settle()  # ``fn`` sees (and may change) a batch with nothing in flight
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        self._drop_waiting_cancelled()
        self._retire([i for i, row in enumerate(self.batch.rows) if self._expired(row)])
        admitted = self._admit()
        if admitted:
            self._prefilling = admitted  # not in the batch yet: a failing prefill must still end them
            self._prefill(admitted)
            self._prefilling = []
        if self.batch.rows:
            self._decode()

    def _expired(self, row: Row) -> bool:
        if row.cancelled:
            row.finished = StopReason.CANCELLED
        elif row.params.time_limit_s is not None and time.monotonic() - row.admitted > row.params.time_limit_s:
            row.finished = StopReason.TIME_LIMIT
        return row.finished != StopReason.NOT_FINISHED

    def _drop_waiting_cancelled(self) -> None:
        for row in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(row)
            self._dequeued(1)
            row.finished = StopReason.CANCELLED
            self._finish(row)

    def _admit(self) -> list[Row]:
        """scheduler.py picks the rows; the engine pins their LoRA slots, adapters already in a slot first (a new
        one then evicts none that this step admits). A row that gets no slot after all stays queued, in place."""
        if not self.waiting or len(self.batch) >= self.config.max_batch_size:
            return []
        self._settle()  # rows join behind a batch whose tokens are all read
        waiting = list(self.waiting)
        plan = schedule([Candidate(len(r.prompt_ids) + r.num_virtual_tokens, r.lora_key, r.passed_over)
                         for r in waiting], Capacity.of([r.lora_key for r in self.batch.rows], self.config))
        for i in plan.passed_over:
            waiting[i].passed_over += 1
        chosen = [waiting[i] for i in plan.admit]
        self.runner.activate(chosen)
        admitted = [r for r in chosen if r.lora_key is None or r.slot]
        now = time.monotonic()
        for row in admitted:
            row.admitted = now
            self.observers.request_admitted(row, now - row.submitted)
        self.waiting = deque(r for r in waiting if not r.admitted)  # 0.0 until admitted
        self._dequeued(len(admitted))
        return admitted

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def _prefill(self, rows: list[Row]) -> None:
        """The runner prefills them; their first tokens are sampled; those still going join the batch."""
        first = len(self.batch)
        self.sampler.place(first, [r.sampler for r in rows], [r.prompt_ids for r in rows])  # where they join
        try:
            prefilled = self.runner.prefill(rows)
        except torch.OutOfMemoryError:
            self._refuse(rows, first)
            return
        self.observers.prefill_launched(rows)
        for row in rows:
            row.emit(GenerationEvent("start", input_token_count=len(row.prompt_ids), seed=row.sampler.seed))
        self._sample_and_emit(rows, prefilled.logits, first)
        self.observers.prefill_done(rows, sum(len(r.prompt_ids) for r in rows))
        done = [i for i, r in enumerate(rows) if r.finished != StopReason.NOT_FINISHED]
        if prefilled.cache is None:  # straight into the pool: all join, those done leave at once
            self.runner.join(rows, prefilled, list(range(len(rows))))
            self._retire([first + i for i in done])
            return
        live = [i for i in range(len(rows)) if i not in set(done)]
        self.sampler.keep(list(range(first)) + [first + i for i in live])  # as the batch appends them
        for i in done:
            self._finish(rows[i])
        self.runner.join(rows, prefilled, live)

    def _refuse(self, rows: list[Row], first: int) -> None:
        """The prefill of ``rows`` ran out of device memory (its activations, or the key/value pool growing
        for a long prompt): they end with RESOURCE_EXHAUSTED and the running batch goes on. Nothing of theirs
        is in it: the prefill wrote only pool rows past the batch's (zeroed here), and a pool that failed to
        grow kept its storage (``KvPool._allocate``)."""
        log.warning("out of device memory prefilling %d request(s) of %d prompt tokens; %d running rows go on",
                    len(rows), sum(len(r.prompt_ids) for r in rows), first)
        self.sampler.keep(list(range(first)))  # their places, set before the prefill
        self.runner.discard_prefill()
        error = ResourceExhausted("out of device memory for this request's prompt; retry later, or send a "
                                  "shorter prompt")
        for row in rows:
            row.finished, row.error = StopReason.ERROR, error
            self._finish(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _make_room(self) -> None:
        """Grow the pool for this step's rows before its forward. Out of device memory there, the rows whose
        length needs the growth end with RESOURCE_EXHAUSTED, and the others decode on, untouched (growing the
        entries grows them for every row: one long generation must not end its neighbours)."""
        try:
            self.runner.reserve_decode()
        except torch.OutOfMemoryError:
            over = self.runner.rows_past_capacity()
            if not over:  # the rows dimension, not one row's length: no row to blame
                raise
            log.warning("out of device memory growing the key/value pool past %d entries a row: %d long row(s) "
                        "end, %d go on", self.runner.pool.capacity, len(over), len(self.batch.rows) - len(over))
            error = ResourceExhausted(f"out of device memory for a key/value cache longer than "
                                      f"{self.runner.pool.capacity} entries; retry later, or ask for fewer tokens")
            for i in over:
                self.batch.rows[i].finished, self.batch.rows[i].error = StopReason.ERROR, error
            self._retire(over)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _decode(self) -> None:
        """Launch a decode step for every running row, fed with the step in flight's tokens if there is one,
        then hand that one's tokens out; keep the new step in flight while the batch stays steady."""
        self._make_room()
        if not self.batch.rows:
            return
        rows = self.batch.rows
        if self._in_flight is not None and list(map(id, self._in_flight.rows)) != list(map(id, rows)):
            self._settle()  # the batch changed under it (every change settles first): its tokens are not these
        ahead, self._in_flight = self._in_flight, None
        started = time.perf_counter()
        out = self.runner.decode(None if ahead is None else ahead.sampled.tokens, self.sampler.eos_bans(0, len(rows)))
        step = StepInFlight(list(rows), self.sampler.launch(0, out.logits, out.greedy), started)
        self.observers.decode_launched(rows, time.perf_counter() - started)
        if ahead is not None:
            self.steps_run_ahead += 1
            self._deliver(ahead, launched_since=1)
        if self.config.run_ahead and may_run_ahead(rows, self.base.max_sequence_length):
            self._in_flight = step
            return
        self._deliver(step, launched_since=0)
        self._retire([i for i, r in enumerate(rows) if r.finished != StopReason.NOT_FINISHED])

    def _settle(self) -> None:
        """Read and hand out the tokens of the step in flight, if any; rows it ended leave at the next retire."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._deliver(step, launched_since=0)

    def _deliver(self, step: StepInFlight, launched_since: int) -> None:
        """Hand a decode step's tokens to its rows that were still going when it was launched (the others ended
        at the step before: their token of this one is dropped). ``launched_since``: steps launched after
        this one, whose positions the rows have already advanced by."""
        live = [r for r in step.rows if r.finished == StopReason.NOT_FINISHED]
        self._hand_out(step.rows, step.sampled.result(), launched_since)
        now = time.perf_counter()
        if live:  # the time since the previous step's tokens went out, or since launch if later
            self.observers.decode_step(live, now - max(step.started, self._delivered_at))
        self._delivered_at = now

    def _sample_and_emit(self, rows: list[Row], logits: torch.Tensor, first: int) -> None:
        """``rows`` hold sampler positions ``first ..`` (sampling.py): every row's token in a few batched ops
        and one host copy."""
        self._hand_out(rows, self.sampler.sample(first, logits), 0)

    def _hand_out(self, rows: list[Row], sampled: tuple[list[int], list[bool]], launched_since: int) -> None:
        hand_out(rows, sampled, self.eos_ids, self.base.max_sequence_length, launched_since)

    def _retire(self, indices: list[int]) -> None:
        if not indices:
            return
        if self._in_flight is not None:  # its rows are the batch's: read its tokens before the batch changes
            self._settle()
            indices = [i for i, r in enumerate(self.batch.rows) if r.finished != StopReason.NOT_FINISHED]
        gone = set(indices)
        for i in indices:
            self._finish(self.batch.rows[i])
        before = {id(row): i for i, row in enumerate(self.batch.rows)}
        self.runner.keep([i for i in range(len(self.batch.rows)) if i not in gone])
        self.sampler.keep([before[id(row)] for row in self.batch.rows])  # its positions follow the rows

    def _finish(self, row: Row) -> None:
        """Send the last event and give back the row's slot."""
        self._rows_by_id.pop(row.request_id, None)
        self.runner.release(row)
        self.observers.request_finished(row)
        row.emit(GenerationEvent("end", generated_token_count=len(row.generated), stop_reason=row.finished,
                                 token_ids=list(row.generated), error=row.error))

    def _fail_all(self, exc: Exception, release: bool = True) -> None:
        """A step failed in a way no one row explains (e.g. out of memory): end every row in flight with the
        error; keep serving. ``release=False`` when the device failed: the pool is not touched then."""
        if not isinstance(exc, AdapterdError):
            log.exception("engine step failed")
            if isinstance(exc, torch.OutOfMemoryError):
                exc = ResourceExhausted("out of device memory while generating; retry later")
        in_batch = {id(r) for r in self.batch.rows}
        rows = self.batch.rows + [r for r in self._prefilling
                                  if id(r) not in in_batch and r.finished == StopReason.NOT_FINISHED]
        self.runner.clear(release)
        self.sampler.keep([])
        self._prefilling = []
        self._in_flight = None
        for row in rows:
            self._rows_by_id.pop(row.request_id, None)
            if row.slot:  # the count only: with the device failed, no slot is evicted (that writes to it)
                self.runner.slots.release(row.slot)
                row.slot = 0
            row.finished = StopReason.ERROR
            self.observers.request_finished(row)
            row.emit(GenerationEvent("end", stop_reason=StopReason.ERROR, error=exc,
                                     generated_token_count=len(row.generated)))
        if release and torch.cuda.is_available():
            torch.cuda.empty_cache()
