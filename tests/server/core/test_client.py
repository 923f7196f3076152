"""The front end's side of the process boundary (``EngineClient``): what it does with the core's frames."""

from __future__ import annotations

import asyncio

import zmq

from adapterd.server.core.client import EngineClient
from adapterd.server.core.protocol import Event, Outputs
from adapterd.server.engine import StopReason
from adapterd.server.errors import Unavailable


def test_a_request_named_lost_ends_its_stream_with_unavailable_and_later_events_are_ignored(tmp_path):
    """The core dropped a frame for this front end (it fell behind) and names the requests that were in it:
    their streams end at once with a retryable error; the others go on, and an event that still comes for a
    lost request (its cancellation's end) reaches nobody."""
    client = EngineClient(f"ipc://{tmp_path}/core.sock", tokenizer=None)
    try:
        lost, kept = asyncio.Queue(), asyncio.Queue()
        client._streams.update(lost_one=lost, kept_one=kept)
        client._deliver(Outputs([Event("kept_one", "delta", [7])], lost=["lost_one", "unknown"]))
        end = lost.get_nowait()
        assert end.kind == "end" and end.stop_reason == StopReason.ERROR and isinstance(end.error, Unavailable)
        assert "lost" in str(end.error) and "retry" in str(end.error)
        assert "lost_one" not in client._streams
        assert kept.get_nowait().token_ids == [7]
        client._deliver(Outputs([Event("lost_one", "end", [1, 2], stop_reason=int(StopReason.CANCELLED))]))
        assert lost.empty()
    finally:
        client.close()


def test_requests_go_by_the_cores_connection_once_it_is_made_and_their_cancels_the_same_way(
        tiny_model_dir, adapter_root):
    """A client against a real core (in this process): its first Submit goes by the DEALER and names the
    client's outputs socket; the core connects to it, and from then on Submits, Cancels and calls go over that
    connection, and the core's answers come back on it. Each request's tokens are the same either way; a stream
    left early is cancelled in the core."""
    from transformers import AutoTokenizer

    from adapterd.server.engine import GenerationParams
    from tests.server.core.conftest import core_in_a_thread

    params = GenerationParams(max_new_tokens=4, min_new_tokens=4)

    async def tokens() -> list[int]:
        async for event in client.generate([5, 17, 42, 99], params, None):
            if event.kind == "end":
                return event.token_ids
        raise AssertionError("no end")

    async def scenario():
        await client.connect(60)
        by_dealer = await tokens()
        assert client._core_stream is not None and client._core_stream.transport is not None
        sent_by_dealer = []
        dealer_send = client._socket.send
        client._socket.send = lambda payload, *a, **k: sent_by_dealer.append(payload) or dealer_send(payload, *a, **k)
        assert await tokens() == by_dealer and len(by_dealer) == 4
        assert (await client.stats())["running"] == 0  # a call, answered over the connection too
        long = client.generate([5, 17, 42, 99], GenerationParams(max_new_tokens=400, min_new_tokens=400), None)
        async for event in long:
            if event.kind == "delta":
                break
        await long.aclose()  # the client left: the core cancels the request
        for _ in range(200):
            if runtime.engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert runtime.engine.stats()["running"] == 0
        assert sent_by_dealer == []  # neither the Submits, the call nor the Cancel went by the DEALER

    with core_in_a_thread(tiny_model_dir, adapter_root) as (runtime, core):
        client = EngineClient(core.router.getsockopt_string(zmq.LAST_ENDPOINT),
                              AutoTokenizer.from_pretrained(tiny_model_dir))
        try:
            asyncio.run(scenario())
        finally:
            client.close()
