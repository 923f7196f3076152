"""The engine core's frames as a front end receives them (a zmq DEALER speaking the protocol), with the core's
I/O thread serving an in-process runtime on the tiny model."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import zmq

from adapterd.server.core.engine_core import EngineCore
from adapterd.server.core.process import EngineProcess
from adapterd.server.core.protocol import Cancel, Outputs, Submit, encoder, from_core
from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE

PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def core_address(tiny_model_dir, adapter_root):
    runtime = Runtime.load(tiny_model_dir, adapter_root, "none", EngineConfig(max_batch_size=4, max_queue=8),
                           device=TEST_DEVICE, dtype="float32")
    address = EngineProcess.private_address()
    core = EngineCore(runtime, address)
    thread = threading.Thread(target=core.serve, daemon=True)
    thread.start()
    yield address
    core.stop()
    thread.join(10)
    runtime.close()
    core.close()


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
        kinds = {(e.request_id, e.kind) for e in frame.events}
        if ("new", "start") in kinds:
            assert kinds == {("new", "start"), ("new", "delta")}, kinds  # its prefill's events, nothing decoded
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


def test_a_front_end_that_names_its_outputs_socket_gets_its_events_there(front_end, tmp_path):
    """The engine thread pushes the events of a Submit that names an ``ipc://`` PULL socket straight to it
    (nothing through the ROUTER); the stream starts and ends once, its tokens in order."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/outputs.sock"
    pull.bind(address)
    try:
        front_end.send(encoder.encode(Submit("direct", PROMPT, GenerationParams(max_new_tokens=12,
                                                                                min_new_tokens=12),
                                             outputs=address)))
        events = []
        for frame in _outputs(pull, time.monotonic() + 60):
            events += frame.events
            if events[-1].kind == "end":
                break
        kinds = [e.kind for e in events]
        assert kinds[0] == "start" and kinds.count("start") == kinds.count("end") == 1
        deltas = [t for e in events if e.kind == "delta" for t in e.token_ids]
        assert events[-1].token_ids[:len(deltas)] == deltas and len(events[-1].token_ids) == 12  # in order
        assert not front_end.poll(200)  # nothing came the other way
    finally:
        context.destroy(linger=0)


def test_an_outputs_address_that_is_not_ipc_is_ignored(front_end):
    """Only the daemon's own front ends send Submits, and they bind ipc:// sockets: anything else (a TCP
    address, say) is not connected to; the events come back over the ROUTER."""
    front_end.send(encoder.encode(Submit("tcp", PROMPT, GenerationParams(max_new_tokens=1),
                                         outputs="tcp://127.0.0.1:9")))
    frame = next(_outputs(front_end, time.monotonic() + 60))
    assert [(e.request_id, e.kind) for e in frame.events] == [("tcp", "start"), ("tcp", "end")]


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
    """A core serving a runtime of its own (a test that ends or cancels its rows), with a front end's DEALER and
    the PULL socket at ``address`` it names in its Submits; ``finished`` records each request's end."""
    runtime = Runtime.load(tiny_model_dir, adapter_root, "none", EngineConfig(max_batch_size=4, max_queue=8),
                           device=TEST_DEVICE, dtype="float32")
    finished = _Finished()
    runtime.engine.observers.add(finished)
    core = EngineCore(runtime, EngineProcess.private_address())
    thread = threading.Thread(target=core.serve, daemon=True)
    thread.start()
    context = zmq.Context()
    try:
        dealer, pull = context.socket(zmq.DEALER), context.socket(zmq.PULL)
        dealer.connect(core.router.getsockopt_string(zmq.LAST_ENDPOINT))
        address = f"ipc://{tmp_path}/outputs.sock"
        pull.bind(address)
        yield runtime, core, finished, dealer, pull, address
    finally:
        context.destroy(linger=0)
        core.stop()
        thread.join(10)
        runtime.close()
        core.close()


def test_a_front_end_that_goes_away_has_its_requests_cancelled(tiny_model_dir, adapter_root, tmp_path):
    """A front end's process dies with a request in the engine: the PULL socket it named disconnects, and the
    core cancels the request at once instead of generating its tokens for nobody (its row is free again)."""
    with _core_of_its_own(tiny_model_dir, adapter_root, tmp_path) as (runtime, core, finished, dealer, pull, address):
        limit = 400
        dealer.send(encoder.encode(Submit("orphan", PROMPT, GenerationParams(max_new_tokens=limit,
                                                                             min_new_tokens=limit), outputs=address)))
        assert next(_outputs(pull, time.monotonic() + 60)).events[0].kind == "start"  # it runs, and we read it
        pull.close(0)  # the front end's process is gone
        assert finished.done.wait(60)
        reason, generated = finished.rows["orphan"]
        assert reason == StopReason.CANCELLED and generated < limit, (reason, generated)
        assert runtime.engine.stats()["running"] == 0


class _StalledPush:
    """A front end's PUSH socket whose queue is full (the front end fell ``OUTPUT_HWM`` frames behind) while
    ``stalled`` is set: each send raises zmq.Again, as zmq's does then."""

    def __init__(self, push: zmq.Socket) -> None:
        self.push, self.stalled = push, threading.Event()
        self.stalled.set()

    def send(self, data: bytes, flags: int = 0) -> None:
        if self.stalled.is_set():
            raise zmq.Again()
        self.push.send(data, flags)

    def close(self, linger: int | None = None) -> None:
        self.push.close(linger)


def test_a_front_end_that_falls_behind_loses_its_requests_with_an_error_not_their_tokens(
        tiny_model_dir, adapter_root, tmp_path):
    """A front end alive but too far behind (its event loop blocked) cannot take the step's frame: the request
    with events in it is cancelled (its row freed at once), and the next frame that gets through names it as
    lost, so that the front end ends its stream with an error instead of streaming a text with tokens missing
    from the middle, or waiting forever for an end that was dropped. Its later requests are served whole."""
    with _core_of_its_own(tiny_model_dir, adapter_root, tmp_path) as (runtime, core, finished, dealer, pull, address):
        limit = 400
        dealer.send(encoder.encode(Submit("behind", PROMPT, GenerationParams(max_new_tokens=limit,
                                                                             min_new_tokens=limit), outputs=address)))
        frames = _outputs(pull, time.monotonic() + 60)
        assert next(frames).events[0].kind == "start"
        push, monitor = core._direct[address]
        stalled = _StalledPush(push)
        core._direct[address] = stalled, monitor  # from here on the front end's queue is full
        assert finished.done.wait(60)
        reason, generated = finished.rows["behind"]
        assert reason == StopReason.CANCELLED and generated < limit, (reason, generated)
        received = []
        while pull.poll(200):  # what got through before the queue filled: no end among it
            received += from_core.decode(pull.recv()).events
        assert all(e.kind != "end" for e in received)
        stalled.stalled.clear()  # the front end reads again; its next request goes through whole
        dealer.send(encoder.encode(Submit("after", PROMPT, GenerationParams(max_new_tokens=3, min_new_tokens=3),
                                          outputs=address)))
        told, events = [], []
        for frame in frames:
            told += frame.lost
            events += [e for e in frame.events if e.request_id == "after"]
            if events and events[-1].kind == "end":
                break
        assert told == ["behind"]
        assert [e.kind for e in events][0] == "start" and len(events[-1].token_ids) == 3
        assert runtime.engine.stats()["running"] == 0
