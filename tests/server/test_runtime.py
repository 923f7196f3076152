"""The runtime's request path: a reader that falls behind gets waiting deltas as one event, with nothing lost."""

from __future__ import annotations

import asyncio

from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE


def test_slow_reader_gets_coalesced_deltas(tiny_model_dir, adapter_root):
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root, EngineConfig())
    runtime.engine.start()

    async def read(slow: bool):
        events = []
        prompt = runtime.tokenize("hello world")
        async for event in runtime.generate(prompt, GenerationParams(max_new_tokens=40, min_new_tokens=40), None):
            events.append(event)
            if slow and event.kind == "start":
                await asyncio.sleep(0.5)  # the engine finishes meanwhile
        return events

    try:
        fast, slow = asyncio.run(read(False)), asyncio.run(read(True))
    finally:
        runtime.close()
    assert len(slow) < len(fast)
    for events in (fast, slow):
        deltas = [e for e in events if e.kind == "delta"]
        assert sum(len(e.token_ids) for e in deltas) + 1 == events[-1].generated_token_count == 40
        assert "".join(e.text for e in events) == "".join(e.text for e in fast)
        assert [e.generated_token_count for e in deltas] == sorted(e.generated_token_count for e in deltas)
