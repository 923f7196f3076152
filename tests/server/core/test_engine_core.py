"""The engine core's frames as a front end receives them (a zmq DEALER speaking the protocol), with the core's
I/O thread serving an in-process runtime on the tiny model."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import pytest
import zmq

from adapterd.server.core.frames import HEADER, MAX_FRAME, FrameReader, FrameWriter
from adapterd.server.core.protocol import Call, Cancel, Event, Outputs, Reply, Submit, encoder, from_core
from adapterd.server.engine import GenerationParams, StopReason
from adapterd.server.engine.observer import EngineObserver
from tests.server.core.conftest import core_in_a_thread

PROMPT = [5, 17, 42, 99, 7, 3]
FRONT_END = b"front-end-1"  # the DEALER identity of the tests' own front end


@pytest.fixture(scope="module")
def core_address(tiny_model_dir, adapter_root):
    with core_in_a_thread(tiny_model_dir, adapter_root) as (_, core):
        yield core.router.getsockopt_string(zmq.LAST_ENDPOINT)


@pytest.fixture()
def front_end(core_address):
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(core_address)
    yield socket
    context.destroy(linger=0)


def _outputs(socket: zmq.Socket, deadline: float):
    while time.monotonic() < deadline:
        if socket.poll(100):
            message = from_core.decode(socket.recv())
            if isinstance(message, Outputs):
                yield message


def test_a_new_request_gets_its_first_token_before_the_running_batch_decodes(front_end):
    """The step that admits a request runs its prefill, then the running batch's decode step (a whole model
    forward). The new row's first token must not wait for that forward: the engine driven in-process hands it
    over at once, and time to first token under load is what its user waits for."""
    front_end.send(encoder.encode(Submit("long", PROMPT, GenerationParams(max_new_tokens=200, min_new_tokens=200))))
    deadline = time.monotonic() + 60
    frames = _outputs(front_end, deadline)
    for frame in frames:  # until "long" is decoding
        if any(e.request_id == "long" and e.kind == "delta" for e in frame.events):
            break
    front_end.send(encoder.encode(Submit("new", PROMPT, GenerationParams(max_new_tokens=4, min_new_tokens=4))))
    for frame in frames:
        kinds = [(e.request_id, e.kind) for e in frame.events]
        if ("new", "start") in kinds:
            # Its prefill's events, nothing decoded after them (that step would give "new" a second delta and
            # "long" one after them). Before them, "long" may have its token of the step that was in flight
            # when "new" was admitted (engine/delivery.py: it is read before a row joins).
            first = kinds.index(("new", "start"))
            assert kinds[first:] == [("new", "start"), ("new", "delta")], kinds
            assert set(kinds[:first]) <= {("long", "delta")}, kinds
            break
    else:
        pytest.fail("no start event for the new request")
    front_end.send(encoder.encode(Cancel("long")))  # the core is idle again for the next test
    ended = set()
    for frame in frames:
        ended |= {e.request_id for e in frame.events if e.kind == "end"}
        if ended >= {"long", "new"}:
            break


def test_a_request_that_ends_at_its_prefill_gets_start_and_end_in_one_frame(front_end):
    """Nothing is decoded after such a prefill at idle, so its frame waits for nothing: one frame, not two."""
    front_end.send(encoder.encode(Submit("one", PROMPT, GenerationParams(max_new_tokens=1))))
    frame = next(_outputs(front_end, time.monotonic() + 60))
    assert [(e.request_id, e.kind) for e in frame.events] == [("one", "start"), ("one", "end")]
    assert len(frame.events[1].token_ids) == 1


class _OutputsSocket:
    """A front end's outputs socket as the daemon's listens (``Submit.outputs``): the frames the core writes to
    it once it has connected."""

    def __init__(self, path) -> None:
        self.address = f"unix:{path}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.conn: socket.socket | None = None
        self.reader = FrameReader()

    def frames(self, deadline: float):
        """The frames (``Outputs``, ``Reply``) that arrive before ``deadline`` (the core connects on its first
        Submit)."""
        buffered: list[bytes] = []
        while time.monotonic() < deadline:
            if buffered:
                yield from_core.decode(buffered.pop(0))
                continue
            sock = self.conn or self.listener
            if not select.select([sock], [], [], 0.1)[0]:
                continue
            if self.conn is None:
                self.conn = self.listener.accept()[0]
                continue
            data = self.conn.recv(1 << 16)
            if not data:
                return
            buffered += self.reader.feed(data)

    def pending(self, wait: float) -> list[Outputs]:
        """The frames that arrive within ``wait`` seconds."""
        return list(self.frames(time.monotonic() + wait))

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


def test_a_front_end_that_names_its_outputs_socket_gets_its_events_there(front_end, tmp_path):
    """The core connects to the Unix socket a Submit names and the engine thread writes the request's events
    there (nothing through the ROUTER); the stream starts and ends once, its tokens in order."""
    outputs = _OutputsSocket(tmp_path / "outputs.sock")
    try:
        front_end.send(encoder.encode(Submit("direct", PROMPT, GenerationParams(max_new_tokens=12,
                                                                                min_new_tokens=12),
                                             outputs=outputs.address)))
        events = []
        for frame in outputs.frames(time.monotonic() + 60):
            events += frame.events
            if events[-1].kind == "end":
                break
        kinds = [e.kind for e in events]
        assert kinds[0] == "start" and kinds.count("start") == kinds.count("end") == 1
        deltas = [t for e in events if e.kind == "delta" for t in e.token_ids]
        assert events[-1].token_ids[:len(deltas)] == deltas and len(events[-1].token_ids) == 12  # in order
        assert not front_end.poll(200)  # nothing came the other way
    finally:
        outputs.close()


@pytest.mark.parametrize("outputs", ["tcp://127.0.0.1:9", "ipc:///tmp/x.sock", "unix:/nonexistent/outputs.sock"])
def test_an_outputs_address_the_core_cannot_use_sends_the_events_by_the_router(front_end, outputs):
    """Only the daemon's own front ends send Submits, and they listen on Unix sockets: anything else (a TCP
    address, say) is not connected to, nor is a path where nothing listens; the events come back over the
    ROUTER instead, none lost."""
    front_end.send(encoder.encode(Submit("elsewhere", PROMPT, GenerationParams(max_new_tokens=1), outputs=outputs)))
    frame = next(_outputs(front_end, time.monotonic() + 60))
    assert [(e.request_id, e.kind) for e in frame.events] == [("elsewhere", "start"), ("elsewhere", "end")]


class _Finished(EngineObserver):
    """Each finished request's (stop reason, tokens generated), by request id (engine thread)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[StopReason, int]] = {}
        self.done = threading.Event()

    def request_finished(self, row) -> None:
        self.rows[row.request_id] = (row.finished, len(row.generated))
        self.done.set()


@contextlib.contextmanager
def _core_of_its_own(tiny_model_dir, adapter_root, tmp_path):
    """A core serving a runtime of its own (a test that ends or cancels its rows), with a front end's DEALER
    (identity ``FRONT_END``) and the outputs socket it names in its Submits; ``finished`` records each request's
    end."""
    finished = _Finished()
    with core_in_a_thread(tiny_model_dir, adapter_root) as (runtime, core):
        runtime.engine.observers.add(finished)
        with _front_end_of(core, tmp_path) as (dealer, outputs):
            yield runtime, core, finished, dealer, outputs


@contextlib.contextmanager
def _front_end_of(core, tmp_path):
    """A front end's DEALER (identity ``FRONT_END``) connected to ``core``, and its outputs socket."""
    context = zmq.Context()
    outputs = _OutputsSocket(tmp_path / "outputs.sock")
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, FRONT_END)
        dealer.connect(core.router.getsockopt_string(zmq.LAST_ENDPOINT))
        yield dealer, outputs
    finally:
        outputs.close()
        context.destroy(linger=0)


def test_a_front_end_that_goes_away_has_its_requests_cancelled(tiny_model_dir, adapter_root, tmp_path):
    """A front end's process dies with a request in the engine: the outputs connection closes, and the core
    cancels the request at once instead of generating its tokens for nobody (its row is free again)."""
    with _core_of_its_own(tiny_model_dir, adapter_root, tmp_path) as (runtime, core, finished, dealer, outputs):
        limit = 400
        dealer.send(encoder.encode(Submit("orphan", PROMPT, GenerationParams(max_new_tokens=limit,
                                                                             min_new_tokens=limit),
                                          outputs=outputs.address)))
        assert next(outputs.frames(time.monotonic() + 60)).events[0].kind == "start"  # it runs, and we read it
        outputs.close()  # the front end's process is gone
        assert finished.done.wait(60)
        reason, generated = finished.rows["orphan"]
        assert reason == StopReason.CANCELLED and generated < limit, (reason, generated)
        assert runtime.engine.stats()["running"] == 0
        deadline = time.monotonic() + 10
        while core._writers and time.monotonic() < deadline:  # the I/O thread closes its side too
            time.sleep(0.05)
        assert not core._writers


class _StalledWriter:
    """A front end's outputs connection whose backlog is full (the front end fell ``OUTPUT_HWM`` frames behind)
    while ``stalled`` is set: each send is refused, as ``FrameWriter``'s is then."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer, self.stalled, self.closed = writer, threading.Event(), False
        self.stalled.set()

    def send(self, frame: bytes) -> bool:
        return False if self.stalled.is_set() else self.writer.send(frame)

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        self.writer.close()


def test_a_front_end_that_falls_behind_loses_its_requests_with_an_error_not_their_tokens(
        tiny_model_dir, adapter_root, tmp_path):
    """A front end alive but too far behind (its event loop blocked) cannot take the step's frame: the request
    with events in it is cancelled (its row freed at once), and the next frame that gets through names it as
    lost, so that the front end ends its stream with an error instead of streaming a text with tokens missing
    from the middle, or waiting forever for an end that was dropped. Its later requests are served whole."""
    with _core_of_its_own(tiny_model_dir, adapter_root, tmp_path) as (runtime, core, finished, dealer, outputs):
        limit = 400
        dealer.send(encoder.encode(Submit("behind", PROMPT, GenerationParams(max_new_tokens=limit,
                                                                             min_new_tokens=limit),
                                          outputs=outputs.address)))
        frames = outputs.frames(time.monotonic() + 60)
        assert next(frames).events[0].kind == "start"
        stalled = _StalledWriter(core._writers[FRONT_END])
        core._writers[FRONT_END] = stalled  # from here on the front end's backlog is full
        assert finished.done.wait(60)
        reason, generated = finished.rows["behind"]
        assert reason == StopReason.CANCELLED and generated < limit, (reason, generated)
        received = [e for frame in outputs.pending(0.3) for e in frame.events]  # what got through before
        assert all(e.kind != "end" for e in received)
        stalled.stalled.clear()  # the front end reads again; its next request goes through whole
        dealer.send(encoder.encode(Submit("after", PROMPT, GenerationParams(max_new_tokens=3, min_new_tokens=3),
                                          outputs=outputs.address)))
        told, events = [], []
        for frame in outputs.frames(time.monotonic() + 60):
            told += frame.lost
            events += [e for e in frame.events if e.request_id == "after"]
            if events and events[-1].kind == "end":
                break
        assert told == ["behind"]
        assert [e.kind for e in events][0] == "start" and len(events[-1].token_ids) == 3
        assert runtime.engine.stats()["running"] == 0


def _write(outputs: _OutputsSocket, message) -> None:
    payload = encoder.encode(message)
    outputs.conn.sendall(HEADER.pack(len(payload)) + payload)


def test_submits_and_cancels_over_the_outputs_connection(tiny_model_dir, adapter_root, tmp_path):
    """Once the core has connected to a front end's outputs socket, the front end sends its Submits, Cancels and
    calls over that connection too: served, cancelled and answered as by the ROUTER, the events and replies on
    the same connection; a frame that is not ours closes it (and cancels what the front end had running)."""
    with _core_of_its_own(tiny_model_dir, adapter_root, tmp_path) as (runtime, core, finished, dealer, outputs):
        dealer.send(encoder.encode(Submit("first", PROMPT, GenerationParams(max_new_tokens=2),
                                          outputs=outputs.address)))
        frames = outputs.frames(time.monotonic() + 60)
        events = []
        while not any(e.kind == "end" for e in events):
            events += next(frames).events
        _write(outputs, Submit("second", PROMPT, GenerationParams(max_new_tokens=3, min_new_tokens=3),
                               outputs=outputs.address))
        events = []
        while not any(e.kind == "end" for e in events):
            events += [e for e in next(frames).events if e.request_id == "second"]
        assert events[0].kind == "start" and len(events[-1].token_ids) == 3
        limit = 400
        _write(outputs, Submit("long", PROMPT, GenerationParams(max_new_tokens=limit, min_new_tokens=limit)))
        assert next(frames).events[0] == Event("long", "start", input_token_count=len(PROMPT))
        finished.done.clear()
        _write(outputs, Cancel("long"))
        assert finished.done.wait(60)
        assert finished.rows["long"][0] == StopReason.CANCELLED and finished.rows["long"][1] < limit
        _write(outputs, Call(7, "stats"))
        reply = next(frame for frame in frames if isinstance(frame, Reply))  # after the cancelled row's last frames
        assert isinstance(reply, Reply) and reply.call_id == 7 and reply.value["running"] == 0
        assert not dealer.poll(200)  # nothing came back by the ROUTER
        outputs.conn.sendall(HEADER.pack(MAX_FRAME + 1))
        deadline = time.monotonic() + 10
        while core._writers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not core._writers
