"""The front end's side of the process boundary: ``EngineClient``, the runtime facade the RPC handlers call.

It offers the methods of the in-process ``Runtime`` (``adapter``, ``prompt_ids``, ``tokenize_text``,
``generate``, ``load_adapter``, ``unload_adapter``, ``list_adapters``, ``model_info``, ``stats``) and keeps
the work a front end can do to itself: prompts are tokenized here, and each request's token events are
detokenized and matched against its stop sequences here (``engine/output.py``). Only token ids, parameters
and adapter ids go to the engine core, from the event loop's thread alone. The client listens on a Unix socket
of its own (in a private directory) and names it in its first Submit, sent over a zmq DEALER; the core
connects to it, and from then on the core's engine thread writes the token events into that connection, and
the client sends its Submits, Cancels and calls over it (``frames.py``): neither way passes through another
thread, of the core or of zmq.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from ..adapters.store import AdapterRecord
from ..engine.output import RequestOutput, text_events
from ..engine.request import GenerationEvent, GenerationParams, StopReason
from ..errors import Unavailable
from ..prompts import Prompts, PromptsFacade
from ..runtime import request_name
from .frames import HEADER, FrameError, FrameReader
from .process import private_dir
from .protocol import (
    AdapterRef,
    Call,
    Cancel,
    ModelInfo,
    Outputs,
    Reply,
    Submit,
    encoder,
    engine_event,
    from_core,
    rebuild_error,
)

log = logging.getLogger(__name__)

DOWN_MESSAGE = "the engine stopped unexpectedly and is restarting; retry shortly"
LOST_MESSAGE = ("this request's output was lost between the engine and the server's front end (the front end "
                "fell behind and the engine cancelled the request); retry")


class EngineClient(PromptsFacade):
    def __init__(self, address: str, tokenizer: Any) -> None:
        self.address = address
        self.tokenizer = tokenizer
        self.info: ModelInfo | None = None  # the core's answer to "hello" (``connect``)
        self.prompts: Prompts | None = None  # built with the model's context length (``connect``)
        self.up = True  # False while the core is down (between ``core_down`` and ``core_up``)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._outputs_dir = private_dir("outputs")  # mode 0700: this user's alone
        self.outputs_address = f"unix:{self._outputs_dir}/outputs.sock"
        self._outputs: asyncio.Server | None = None  # listening from ``connect`` on
        # The engine core's connection to it, once made: Submits, Cancels and calls go that way too (a write from
        # this thread straight into the core's I/O thread, no zmq I/O thread on either side); before, the DEALER.
        self._core_stream: _OutputsProtocol | None = None
        self._streams: dict[str, asyncio.Queue[GenerationEvent]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._receivers: list[asyncio.Task] = []
        # Called with each adapter id that resolved (it loaded in the core): the front end's metrics labels
        # count uses here, as the engine's observer does where the engine runs in the same process.
        self.on_adapter_used: Callable[[str], None] | None = None

    async def connect(self, timeout: float) -> None:
        """Start reading the core's frames and ask what it serves (``timeout`` seconds at most)."""
        self._outputs = await asyncio.get_running_loop().create_unix_server(
            self._accept_core, self.outputs_address.removeprefix("unix:"))
        self._receivers = [asyncio.ensure_future(self._receive(self._socket))]
        self.info = msgspec.convert(await asyncio.wait_for(self.call("hello"), timeout), ModelInfo)
        self.prompts = Prompts(self.tokenizer, self.info.max_sequence_length, self.info.vocab_size)

    def close(self) -> None:
        for receiver in self._receivers:
            receiver.cancel()
        self.core_down("the daemon is shutting down")
        if self.prompts is not None:
            self.prompts.close()
        self._socket.close(0)
        if self._outputs is not None:
            self._outputs.close()
        self._context.term()
        shutil.rmtree(self._outputs_dir, ignore_errors=True)

    # ------------------------------------------------------------------ the core's health

    def core_down(self, message: str = DOWN_MESSAGE) -> None:
        """The core died (or the daemon is stopping): every request and call in flight ends with UNAVAILABLE
        and ``message``; new ones are refused until ``core_up``."""
        self.up = False
        error = Unavailable(message)
        for queue in self._streams.values():
            queue.put_nowait(GenerationEvent("end", stop_reason=StopReason.ERROR, error=error))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    def core_up(self) -> None:
        self.up = True

    def _ready(self) -> None:
        if not self.up:
            raise Unavailable(DOWN_MESSAGE)

    async def _receive(self, socket: zmq.asyncio.Socket) -> None:
        """Frames from the core on the DEALER: replies to calls, and the events of requests whose Submit named
        no outputs socket (or whose outputs socket the core could not connect to)."""
        while True:
            self._received(await socket.recv())

    def _received(self, frame: bytes) -> None:
        """One frame from the core, by the DEALER or by the core's connection."""
        try:
            message = from_core.decode(frame)
        except msgspec.DecodeError:
            log.error("ignored a malformed frame from the engine core")
            return
        if isinstance(message, Outputs):
            self._deliver(message)
        else:
            self._answered(message)

    def _answered(self, message: Reply) -> None:
        future = self._calls.pop(message.call_id, None)
        if future is not None and not future.done():
            if message.error is not None:
                future.set_exception(rebuild_error(message.error))
            else:
                future.set_result(message.value)

    def _deliver(self, message: Outputs) -> None:
        for request_id in message.lost:  # events of these were dropped: their streams end now, with an error
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(GenerationEvent("end", stop_reason=StopReason.ERROR,
                                                 error=Unavailable(LOST_MESSAGE)))
        for event in message.events:
            queue = self._streams.get(event.request_id)
            if queue is not None:
                queue.put_nowait(engine_event(event))

    def _accept_core(self) -> _OutputsProtocol:
        self._core_stream = _OutputsProtocol(self._received)
        return self._core_stream

    def _sender(self) -> Callable[[bytes], Any]:
        """How to send a request's Submit, and then its Cancel: the same way both, so that the Cancel cannot
        overtake its Submit (the core reads the DEALER and the connection in no set order)."""
        stream = self._core_stream
        if stream is not None and stream.transport is not None and not stream.transport.is_closing():
            transport = stream.transport
            return lambda payload: transport.write(HEADER.pack(len(payload)) + payload)
        return self._socket.send

    async def call(self, method: str, *args: str) -> Any:
        """Run one of the core's calls (``EngineCore.handlers``) and return its plain-data value."""
        self._ready()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            sent = self._sender()(encoder.encode(Call(call_id, method, list(args))))
            if sent is not None:
                await sent
            return await future
        finally:
            self._calls.pop(call_id, None)

    # ------------------------------------------------------------------ the facade

    def model_info(self) -> ModelInfo:
        return self.info

    async def stats(self) -> dict[str, int]:
        return await self.call("stats")

    async def adapter(self, adapter_id: str, field: str = "adapter_id") -> AdapterRef | None:
        """The adapter, loaded in the core if it was not (NOT_FOUND, FAILED_PRECONDITION... as the store says)."""
        if not adapter_id:
            return None
        ref = msgspec.convert(await self.call("adapter", adapter_id, field), AdapterRef)
        if self.on_adapter_used is not None:
            self.on_adapter_used(ref.adapter_id)
        return ref

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None,
                       request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Submit one request to the core and yield its events until "end". Leaving early cancels it."""
        self._ready()
        request_id = request_name(request_id)
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._streams[request_id] = events
        send = self._sender()
        try:
            sent = send(encoder.encode(Submit(request_id, list(prompt_ids), params,
                                              adapter.adapter_id if adapter is not None else "",
                                              self.outputs_address)))
            if sent is not None:  # the DEALER's send (a future), not the connection's write
                await sent
            output = RequestOutput(self.tokenizer, params)
            async for event in text_events(events, output, lambda: self._cancel(send, request_id)):
                yield event
        finally:
            self._streams.pop(request_id, None)

    def _cancel(self, send: Callable[[bytes], Any], request_id: str) -> None:
        if self.up:
            with contextlib.suppress(zmq.ZMQError, OSError):
                send(encoder.encode(Cancel(request_id)))

    async def load_adapter(self, adapter_id: str) -> AdapterRecord:
        return msgspec.convert(await self.call("load", adapter_id), AdapterRecord)

    async def unload_adapter(self, adapter_id: str) -> AdapterRecord:
        return msgspec.convert(await self.call("unload", adapter_id), AdapterRecord)

    async def list_adapters(self) -> list[AdapterRecord]:
        return msgspec.convert(await self.call("list"), list[AdapterRecord])


class _OutputsProtocol(asyncio.Protocol):
    """The engine core's connection to this front end's outputs socket: ``Outputs`` and ``Reply`` frames in,
    each handed to ``received`` on the event loop as soon as its last byte arrives; Submits, Cancels and calls
    out (``EngineClient._sender``)."""

    def __init__(self, received: Callable[[bytes], None]) -> None:
        self.received = received
        self.frames = FrameReader()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # the core died or restarts: the next Submit goes by the DEALER again

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except FrameError as exc:  # not our core's writer: drop the connection
            log.error("closed an outputs connection: %s", exc)
            self.transport.close()
            return
        for frame in frames:
            self.received(frame)
