"""The engine core's side of the process boundary: one ``Runtime`` served to its front ends over zmq.

Threads of the engine-core process, and who owns which socket (zmq sockets are not thread-safe):
- the I/O thread (the process's main thread) owns the ROUTER socket the front ends connect to. It hands
  submits and cancels to the engine's inbox, and forwards outgoing frames from an inproc PULL socket;
- the engine thread (``server/engine/engine.py``) collects each step's events per front end and, once the
  step is over (``Engine.after_step``), sends one ``Outputs`` frame per front end (a step that prefills sends
  its new rows' first tokens first, as soon as they are sampled): straight to the front end's own PULL
  socket (``Submit.outputs``) through a PUSH socket of the engine thread's, with no other thread on the way.
  That socket's monitor tells it when the front end has gone (its process died): the requests it sent are
  cancelled, so that they give their rows back instead of generating for nobody to their token limit.
  A front end alive but ``OUTPUT_HWM`` frames behind (its event loop blocked) loses the next frame: the
  requests with events in it are cancelled and named in the ``lost`` field of the next frame that gets
  through, so their streams end with UNAVAILABLE, never with tokens missing or no end;
- a few worker threads run calls that may touch the disk (adapter loads, listing) and submits whose adapter
  must be loaded first, and send their replies through their own PUSH sockets.
No gRPC and no tokenizing here: the engine's host thread only schedules and launches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..engine.batch import Row
from ..engine.observer import EngineObserver
from ..engine.request import GenerationEvent, StopReason
from ..errors import AdapterdError, InvalidArgument
from ..runtime import Runtime
from .protocol import (
    Call,
    Cancel,
    Event,
    Outputs,
    Reply,
    Submit,
    encoder,
    error_info,
    event_message,
    to_core,
)
from .step_stats import StepCounter

log = logging.getLogger(__name__)

OUTBOX = "inproc://adapterd-core-outbox"
CALL_THREADS = 4  # adapter loads and listings at once; each is bounded by the store's own limits
POLL_MS = 200  # how often the I/O thread looks at ``stopping`` while idle, milliseconds
OUTPUT_HWM = 1000  # frames queued for one front end (zmq's default, ~8 s of steps at 8 ms) before one is lost


class _SendAfterPrefill(EngineObserver):
    """Sends the events of a prefill (each new row's start and first token) as soon as it is done, when a
    decode forward follows in the same step (rows running, or a new row not finished by its first token):
    a first token held for the step's end frame waits for that forward (~6 ms for one row, ~14 ms for 64
    rows of a 7B model on an H200), where the engine driven in-process hands it over at once. A row that
    ends at its first token gets its "end" (with that token) right after this hook: one frame at the step's
    end carries both, with no forward in between."""

    def __init__(self, engine: Any, flush: Callable[[], None]) -> None:
        self.engine = engine
        self.flush = flush

    def prefill_done(self, rows: list[Row], prompt_tokens: int) -> None:
        if self.engine.batch.rows or any(r.finished == StopReason.NOT_FINISHED for r in rows):
            self.flush()


class EngineCore:
    """Serves ``runtime`` on ``address`` (``ipc://...``) until ``stop``. ``metrics``: returns the core's
    Prometheus exposition for the ``metrics`` call (None: no metrics)."""

    def __init__(self, runtime: Runtime, address: str, metrics: Callable[[], bytes] | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        self.outbox = self.context.socket(zmq.PULL)
        self.outbox.bind(OUTBOX)
        self.stopping = threading.Event()
        self._local = threading.local()  # each sending thread's PUSH socket
        self._pending: dict[bytes, list[Event]] = {}  # engine thread only: this step's events per front end
        self._outputs_of: dict[bytes, str] = {}  # front end -> its PULL address (``Submit.outputs``)
        # engine thread only: per such address, a PUSH socket and the monitor of its disconnect events
        self._direct: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        # engine thread only: per such address, requests whose events a full queue dropped, not yet told
        self._lost: dict[str, set[str]] = {}
        self._requests_of: dict[bytes, set[str]] = {}  # front end -> its requests in the engine (under _lock)
        self._lock = threading.Lock()  # guards the two sets below (I/O thread and call threads)
        self._waiting_for_load: set[str] = set()  # submits whose adapter a call thread is loading
        self._cancelled_early: set[str] = set()  # cancels that overtook such a submit
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="adapterd-core-call")
        runtime.engine.after_step = self._flush
        # Decode steps, prefills and graph captures, for bench/load_bench.py (the ``steps`` call).
        self.steps = StepCounter(runtime.engine.runner.graph_captures)
        runtime.engine.observers.add(self.steps)
        runtime.engine.observers.add(_SendAfterPrefill(runtime.engine, self._flush))
        self.handlers: dict[str, Callable[..., Any]] = {
            "hello": lambda: runtime.model_info(), "adapter": runtime.adapter_ref,
            "load": lambda adapter_id: runtime._load_and_describe(adapter_id),
            "unload": lambda adapter_id: runtime.store.unload(adapter_id),
            "list": lambda: runtime.store.list(), "stats": lambda: runtime.stats(),
            "metrics": lambda: self.metrics() if self.metrics is not None else b"",
            "steps": lambda: msgspec.structs.asdict(self.steps.counts()),
        }

    # ------------------------------------------------------------------ the I/O thread

    def serve(self) -> None:
        """Route frames until ``stop`` is called (a signal handler, the ``shutdown`` call, a broken engine)."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        while not self.stopping.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self.outbox in ready:
                self._forward_outputs()
            if self.router in ready:
                self._receive()
        self._forward_outputs()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.context.destroy(linger=0)

    def _forward_outputs(self) -> None:
        while True:
            try:
                frames = self.outbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.router.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:  # that front end is gone (or not keeping up): its requests are cancelled below
                log.warning("dropped a frame for a front end that does not read")

    def _receive(self) -> None:
        while True:
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of our front ends
                continue
            try:
                message = to_core.decode(frame)
            except msgspec.DecodeError:
                log.warning("ignored a malformed frame from a front end")
                continue
            if isinstance(message, Submit):
                self._submit(identity, message)
            elif isinstance(message, Cancel):
                self._cancel(message.request_id)
            else:
                self._calls.submit(self._answer, identity, message)

    # ------------------------------------------------------------------ requests

    def _submit(self, identity: bytes, message: Submit) -> None:
        adapter = self.runtime.store.loaded_now(message.adapter_id) if message.adapter_id else None
        if message.adapter_id and adapter is None:  # first contact: load it off this thread
            self._loading(message.request_id, True)
            self._calls.submit(self._submit_after_load, identity, message)
            return
        self._enqueue(identity, message, adapter)

    def _submit_after_load(self, identity: bytes, message: Submit) -> None:
        try:
            adapter = self.runtime.store.get(message.adapter_id)
        except Exception as exc:  # noqa: BLE001 - the request's own failure, answered to it
            self._loading(message.request_id, False)
            self._end_now(identity, message.request_id, exc)
            return
        if not self._loading(message.request_id, False):
            self._enqueue(identity, message, adapter)

    def _loading(self, request_id: str, started: bool) -> bool:
        """Track submits waiting for their adapter; on finishing, True if the request was cancelled meanwhile."""
        with self._lock:
            if started:
                self._waiting_for_load.add(request_id)
                return False
            self._waiting_for_load.discard(request_id)
            cancelled = request_id in self._cancelled_early
            self._cancelled_early.discard(request_id)
            return cancelled

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._waiting_for_load:
                self._cancelled_early.add(request_id)
        self.runtime.engine.cancel(request_id)

    def _enqueue(self, identity: bytes, message: Submit, adapter: Any) -> None:
        request_id = message.request_id
        if message.outputs.startswith("ipc://"):  # the daemon's own front ends bind ipc:// sockets only
            self._outputs_of[identity] = message.outputs
        with self._lock:
            self._requests_of.setdefault(identity, set()).add(request_id)

        def sink(event: GenerationEvent) -> None:  # engine thread
            self._pending.setdefault(identity, []).append(event_message(request_id, event))
            if event.kind == "end":
                with self._lock:
                    self._requests_of.get(identity, set()).discard(request_id)

        try:
            self.runtime.engine.submit(request_id, message.prompt_ids, message.params, adapter, sink)
        except Exception as exc:  # noqa: BLE001 - queue full, engine stopping: this request's answer
            self._end_now(identity, request_id, exc)

    def _end_now(self, identity: bytes, request_id: str, exc: Exception) -> None:
        if not isinstance(exc, AdapterdError):
            log.error("request %s failed before the engine", request_id, exc_info=exc)
        event = GenerationEvent("end", stop_reason=StopReason.ERROR, error=exc)
        self._send(identity, Outputs([event_message(request_id, event)]))

    def _flush(self) -> None:
        """Engine thread, after each step (and after a prefill): one frame per front end holding its events
        (and, to a front end that lost a frame, one naming the lost requests, events or not)."""
        self._cancel_for_departed()
        if not self._pending and not self._lost:
            return
        pending, self._pending = self._pending, {}
        pushed = set()
        for identity, events in pending.items():
            address = self._outputs_of.get(identity)
            if address is None:
                self._send(identity, Outputs(events))
            else:
                self._push(address, events)
                pushed.add(address)
        for address in [a for a in self._lost if a not in pushed]:  # lost ids to tell, no events this step
            self._push(address, [])

    def _push(self, address: str, events: list[Event]) -> None:
        """Engine thread: ``events`` to a front end's PULL socket. The PUSH socket queues frames while its
        connection is being made (zmq's default), so the first frames after ``connect`` are not lost. A front
        end ``OUTPUT_HWM`` frames behind loses the frame: its requests are cancelled (``_lose``)."""
        if address not in self._direct:
            push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
            self._direct[address] = push, push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            push.connect(address)
        push = self._direct[address][0]
        lost = self._lost.get(address)
        try:
            push.send(encoder.encode(Outputs(events, sorted(lost) if lost else [])), zmq.NOBLOCK)
        except zmq.Again:
            self._lose(address, {e.request_id for e in events})
        else:
            self._lost.pop(address, None)

    def _lose(self, address: str, request_ids: set[str]) -> None:
        """A frame for ``address`` was dropped: its requests lost events (tokens, or their end) the front end
        can never get back. Each is cancelled (a no-op for one that already ended) and told as lost."""
        new = request_ids - self._lost.get(address, set())
        self._lost.setdefault(address, set()).update(request_ids)
        for request_id in new:
            self.runtime.engine.cancel(request_id)
        if new:
            log.warning("a front end fell %d frames behind: %d of its requests lost events and were cancelled",
                        OUTPUT_HWM, len(new))

    def _cancel_for_departed(self) -> None:
        """Engine thread, at each flush: a front end whose PULL socket disconnected (its process died; a live
        one keeps it open until it closes) gets its requests cancelled, and its sockets are closed."""
        for address, (push, monitor) in list(self._direct.items()):
            if not monitor.poll(0) or recv_monitor_message(monitor)["event"] != zmq.EVENT_DISCONNECTED:
                continue
            departed = [identity for identity, a in self._outputs_of.items() if a == address]
            with self._lock:
                requests = [r for identity in departed for r in self._requests_of.pop(identity, ())]
            for identity in departed:
                self._outputs_of.pop(identity, None)
            for request_id in requests:
                self.runtime.engine.cancel(request_id)
            if requests:
                log.warning("a front end went away: %d of its requests cancelled", len(requests))
            del self._direct[address]
            self._lost.pop(address, None)
            monitor.close(0)
            push.close(0)

    # ------------------------------------------------------------------ calls

    def _answer(self, identity: bytes, call: Call) -> None:
        handler = self.handlers.get(call.method)
        try:
            if handler is None:
                raise InvalidArgument(f"unknown call {call.method!r}", field="method")
            reply = Reply(call.call_id, value=handler(*call.args))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            if not isinstance(exc, AdapterdError):
                log.error("engine-core call %s failed", call.method, exc_info=exc)
            reply = Reply(call.call_id, error=error_info(exc))
        self._send(identity, reply)

    def _send(self, identity: bytes, message: Outputs | Reply) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.context.socket(zmq.PUSH)
            push.connect(OUTBOX)
        push.send_multipart([identity, encoder.encode(message)])
