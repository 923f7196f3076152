"""The engine core's side of the process boundary: one ``Runtime`` served to its front ends.

Threads of the engine-core process, and who owns which socket (zmq sockets are not thread-safe):
- the I/O thread (the process's main thread) owns the ROUTER socket the front ends connect to and the
  connections it makes to their outputs sockets (which carry a front end's Submits, Cancels and calls once
  made). It hands submits and cancels to the engine's inbox, and forwards outgoing frames from an inproc PULL
  socket to the ROUTER;
- the engine thread (``server/engine/engine.py``) collects each step's events per front end and, once the
  step is over (``Engine.after_step``), sends one ``Outputs`` frame per front end (a step that prefills sends
  its new rows' first tokens first, as soon as they are sampled): straight into the front end's own Unix
  socket (``Submit.outputs``, which the I/O thread connected to), one non-blocking write (``frames.py``), no
  other thread on the way. The I/O thread watches that connection: when it closes (the front end's process
  died) the requests it sent are cancelled, so that they give their rows back instead of generating for
  nobody to their token limit. A front end alive but ``OUTPUT_HWM`` frames behind (its event loop blocked)
  loses the next frame: the requests with events in it are cancelled and named in the ``lost`` field of the
  next frame that gets through, so their streams end with UNAVAILABLE, never with tokens missing or no end;
- a few worker threads run calls that may touch the disk (adapter loads, listing) and submits whose adapter
  must be loaded first, and send their replies over the front end's connection, or (before it is made)
  through their own PUSH sockets to the ROUTER.
No gRPC and no tokenizing here: the engine's host thread only schedules and launches.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq

from ..engine.batch import Row
from ..engine.observer import EngineObserver
from ..engine.request import GenerationEvent, StopReason
from ..errors import AdapterdError, InvalidArgument
from ..runtime import Runtime
from .frames import FrameError, FrameReader, FrameWriter
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
OUTPUT_HWM = 1000  # frames queued for one front end (~8 s of steps at 8 ms) before one is lost
OUTPUTS_SCHEME = "unix:"  # Submit.outputs: the daemon's own front ends listen on Unix sockets only


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
        self.poller = zmq.Poller()  # I/O thread only
        self._local = threading.local()  # each sending thread's PUSH socket
        self._pending: dict[bytes, list[Event]] = {}  # engine thread only: this step's events per front end
        # front end -> its outputs connection (``Submit.outputs``): made and closed by the I/O thread, written by
        # the engine thread (and by call threads ending a request early)
        self._writers: dict[bytes, FrameWriter] = {}
        # I/O thread only: those connections by descriptor (front end, socket, what it sent so far), to read
        self._connections: dict[int, tuple[bytes, socket.socket, FrameReader]] = {}
        # engine thread only: per front end, requests whose events a full backlog dropped, not yet told
        self._lost: dict[bytes, set[str]] = {}
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
            "prefill_times": lambda last: self.steps.prefill_times(int(last)),
        }

    # ------------------------------------------------------------------ the I/O thread

    def serve(self) -> None:
        """Route frames until ``stop`` is called (a signal handler, the ``shutdown`` call, a broken engine)."""
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.outbox, zmq.POLLIN)
        while not self.stopping.is_set():
            ready = dict(self.poller.poll(POLL_MS))
            if self.outbox in ready:
                self._forward_outputs()
            if self.router in ready:
                self._receive()
            for fd in [fd for fd in self._connections if fd in ready]:  # the poller names non-zmq sockets by fd
                self._watch(fd)
        self._forward_outputs()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        for writer in list(self._writers.values()):
            writer.close()
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
            self._dispatch(identity, frame)

    def _dispatch(self, identity: bytes, frame: bytes) -> None:
        """One frame from a front end, by the ROUTER or by its outputs connection (once the core connected to it,
        the front end sends its Submits, Cancels and calls there: no zmq I/O thread on either side)."""
        try:
            message = to_core.decode(frame)
        except msgspec.DecodeError:
            log.warning("ignored a malformed frame from a front end")
            return
        if isinstance(message, Submit):
            self._submit(identity, message)
        elif isinstance(message, Cancel):
            self._cancel(message.request_id)
        else:
            self._calls.submit(self._answer, identity, message)

    # ------------------------------------------------------------------ requests

    def _submit(self, identity: bytes, message: Submit) -> None:
        if message.outputs.startswith(OUTPUTS_SCHEME) and identity not in self._writers:
            self._connect_outputs(identity, message.outputs[len(OUTPUTS_SCHEME):])
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
        self._reply(identity, Outputs([event_message(request_id, event)]))

    # ------------------------------------------------------------------ outputs connections

    def _connect_outputs(self, identity: bytes, path: str) -> None:
        """I/O thread: connect to a front end's outputs socket (a Unix socket it listens on). Where that fails,
        its events go back over the ROUTER, as for a Submit naming none."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.warning("could not connect to a front end's outputs socket (%s): its events go by the ROUTER", exc)
            return
        self._writers[identity] = FrameWriter(sock, OUTPUT_HWM)
        self._connections[sock.fileno()] = identity, sock, FrameReader()
        self.poller.register(sock.fileno(), zmq.POLLIN)

    def _watch(self, fd: int) -> None:
        """I/O thread: an outputs connection is readable: the front end's Submits, Cancels and calls, or its end
        (its process died or closed it), on which its requests are cancelled and the connection closed."""
        identity, sock, reader = self._connections[fd]
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                log.warning("closed a front end's connection that sent a bad frame: %s", exc)
            else:
                for frame in frames:
                    self._dispatch(identity, frame)
                return
        del self._connections[fd]
        self.poller.unregister(fd)  # before the close: the descriptor's number may be reused at once
        self._writers.pop(identity).close()
        with self._lock:
            requests = list(self._requests_of.pop(identity, ()))
        for request_id in requests:
            self.runtime.engine.cancel(request_id)
        if requests:
            log.warning("a front end went away: %d of its requests cancelled", len(requests))

    def _flush(self) -> None:
        """Engine thread, after each step (and after a prefill): one frame per front end holding its events
        (and, to a front end that lost a frame, one naming the lost requests, events or not)."""
        for writer in list(self._writers.values()):
            if writer.pending():
                writer.drain()
        if not self._pending and not self._lost:
            return
        pending, self._pending = self._pending, {}
        for identity, events in pending.items():
            writer = self._writers.get(identity)
            if writer is None:
                self._send(identity, Outputs(events))
            else:
                self._write(identity, writer, events)
        for identity in [i for i in self._lost if i not in pending]:  # lost ids to tell, no events this step
            writer = self._writers.get(identity)
            if writer is None:  # gone: its requests were cancelled when it went
                del self._lost[identity]
            else:
                self._write(identity, writer, [])

    def _write(self, identity: bytes, writer: FrameWriter, events: list[Event]) -> None:
        """Engine thread: ``events`` into a front end's outputs connection. One whose backlog is full (it stopped
        reading, ``OUTPUT_HWM`` frames behind) loses the frame: its requests are cancelled (``_lose``)."""
        lost = self._lost.get(identity)
        if writer.send(encoder.encode(Outputs(events, sorted(lost) if lost else []))):
            self._lost.pop(identity, None)
        elif not writer.closed:
            self._lose(identity, {e.request_id for e in events})

    def _lose(self, identity: bytes, request_ids: set[str]) -> None:
        """A frame for ``identity`` was dropped: its requests lost events (tokens, or their end) the front end
        can never get back. Each is cancelled (a no-op for one that already ended) and told as lost."""
        new = request_ids - self._lost.get(identity, set())
        self._lost.setdefault(identity, set()).update(request_ids)
        for request_id in new:
            self.runtime.engine.cancel(request_id)
        if new:
            log.warning("a front end fell %d frames behind: %d of its requests lost events and were cancelled",
                        OUTPUT_HWM, len(new))

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
        self._reply(identity, reply)

    def _reply(self, identity: bytes, message: Outputs | Reply) -> None:
        """From the I/O thread or a call thread: over the front end's connection where there is one (behind the
        frames the engine thread wrote there), else by the ROUTER."""
        writer = self._writers.get(identity)
        if writer is None:
            self._send(identity, message)
        else:
            writer.send(encoder.encode(message))

    def _send(self, identity: bytes, message: Outputs | Reply) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.context.socket(zmq.PUSH)
            push.connect(OUTBOX)
        push.send_multipart([identity, encoder.encode(message)])
