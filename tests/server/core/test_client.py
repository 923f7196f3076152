"""The front end's side of the process boundary (``EngineClient``): what it does with the core's frames."""

from __future__ import annotations

import asyncio

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
