"""The clients send the adapter id as ``x-adapter-id`` metadata, the key a balancer hashes for affinity
(deploy/SCALING.md): every call that names an adapter carries it, the base's calls do not, and ids that gRPC
metadata cannot carry as they are travel percent-encoded.

The server here is a recording double of the Adapterd service on loopback: what the test checks is what
reaches the wire, which a real daemon does not report (it ignores the header)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from adapterd.clients import ADAPTER_ID_HEADER, AdapterdClient, AsyncAdapterdClient
from adapterd.v1 import adapterd_pb2 as pb
from adapterd.v1 import adapterd_pb2_grpc as pb_grpc


class RecordingService(pb_grpc.AdapterdServicer):
    """Answers the calls that carry an adapter id, and records each call's ``x-adapter-id`` values."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        values = [value for key, value in context.invocation_metadata() if key == ADAPTER_ID_HEADER]
        self.seen.append((method, values))

    def Generate(self, request, context):  # noqa: N802 (gRPC's method names)
        self._record("Generate", context)
        return pb.GenerateResponse(text="ok")

    def GenerateStream(self, request, context):  # noqa: N802
        self._record("GenerateStream", context)
        yield pb.GenerateResponse(text="ok")

    def Tokenize(self, request, context):  # noqa: N802
        self._record("Tokenize", context)
        return pb.TokenizeResponse(token_count=1)

    def LoadAdapter(self, request, context):  # noqa: N802
        self._record("LoadAdapter", context)
        return pb.AdapterInfo(adapter_id=request.adapter_id)

    def UnloadAdapter(self, request, context):  # noqa: N802
        self._record("UnloadAdapter", context)
        return pb.AdapterInfo(adapter_id=request.adapter_id)


@pytest.fixture
def recorded() -> Iterator[tuple[str, RecordingService]]:
    service = RecordingService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdapterdServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(None)


def test_every_call_naming_an_adapter_sends_its_header(recorded):
    target, service = recorded
    with AdapterdClient(target, token="secret", timeout=10) as client:
        client.generate("hi", adapter_id="support/v2")
        list(client.generate_stream("hi", adapter_id="support/v2"))
        client.chat([{"role": "user", "content": "hi"}], adapter_id="support/v2")
        client.tokenize("hi", adapter_id="support/v2")
        client.load_adapter("support/v2")
        client.unload_adapter("support/v2")
    assert service.seen == [(method, ["support/v2"]) for method in
                            ("Generate", "GenerateStream", "Generate", "Tokenize", "LoadAdapter", "UnloadAdapter")]


def test_the_base_sends_no_header(recorded):
    target, service = recorded
    with AdapterdClient(target, timeout=10) as client:
        client.generate("hi")
        client.tokenize("hi")
    assert service.seen == [("Generate", []), ("Tokenize", [])]


def test_an_id_metadata_cannot_carry_is_percent_encoded(recorded):
    target, service = recorded
    with AdapterdClient(target, timeout=10) as client:
        assert client.generate("hi", adapter_id="客服/v 2").text == "ok"
    assert service.seen == [("Generate", ["%E5%AE%A2%E6%9C%8D/v%202"])]


def test_the_callers_own_metadata_is_kept_beside_the_header(recorded):
    target, service = recorded
    with AdapterdClient(target, metadata=[("x-correlation-id", "c1")], timeout=10) as client:
        client.generate("hi", adapter_id="a")
        client.generate("hi", adapter_id="b")  # the header is per call, not accumulated on the client
    assert service.seen == [("Generate", ["a"]), ("Generate", ["b"])]
    assert client.metadata == [("x-correlation-id", "c1")]


def test_the_async_client_sends_the_header_too(recorded):
    target, service = recorded

    async def calls() -> None:
        async with AsyncAdapterdClient(target, timeout=10) as client:
            await client.generate("hi", adapter_id="support/v2")
            [piece async for piece in client.generate_stream("hi", adapter_id="support/v2")]
            await client.tokenize("hi", adapter_id="support/v2")
            await client.load_adapter("support/v2")
            await client.generate("hi")

    asyncio.run(calls())
    assert service.seen == [("Generate", ["support/v2"]), ("GenerateStream", ["support/v2"]),
                            ("Tokenize", ["support/v2"]), ("LoadAdapter", ["support/v2"]), ("Generate", [])]
