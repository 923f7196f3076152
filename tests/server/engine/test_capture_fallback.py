"""A CUDA graph capture that fails (a kernel that synchronises with the host, say) leaves the engine serving
eagerly, with the same tokens. The capture is made to fail here, so the fallback runs on the CPU too."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.graphs import GraphCache
from adapterd.server.errors import ResourceExhausted
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import Collector, run_together


def test_failed_captures_fall_back_to_eager_with_the_same_tokens(tiny_model_dir, adapter_root, monkeypatch):
    attempts = []

    def refuse(self, forward):
        attempts.append(self.name)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphCache, "capture", refuse)
    jobs = [("hello world", None), ("hello world", "lora-qv"), ("你是谁？", "team/lora-all")]
    new = 6
    refs = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, new) for p, a in jobs]
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_batch_size=8))
    engine = runtime.engine
    # as on a GPU, whatever the test device
    engine.runner.decoder.use_graphs = engine.runner.prefiller.use_graphs = True
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=new))
    finally:
        runtime.close()
    assert [events[-1].token_ids for events in results] == refs
    assert sorted(set(attempts)) == ["decode", "prefill"]  # each kind tried once, then gave up on graphs
    assert attempts.count("decode") == attempts.count("prefill") == 1
    assert not engine.runner.decoder.use_graphs and not engine.runner.prefiller.use_graphs
    assert len(engine.runner.decoder.graphs) == len(engine.runner.prefiller.graphs) == 0


class EagerGraph:
    """A stand-in for a captured graph on the CPU: replaying runs the forward again into the same outputs."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.outputs = forward()

    def replay(self) -> None:
        fresh = self.forward()
        if isinstance(fresh, torch.Tensor):  # a prefill's logits; a decode step's are a tuple of tensors
            self.outputs.copy_(fresh)
        else:
            for kept, new in zip(self.outputs, fresh, strict=True):
                kept.copy_(new)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_out_of_memory_while_capturing_ends_the_rows_and_keeps_serving(kind, tiny_model_dir, adapter_root,
                                                                       monkeypatch):
    """Out of memory is not a kernel that cannot be captured: the rows in flight end with RESOURCE_EXHAUSTED
    (as in any step that runs out of memory), graphs stay on, and the next request gets its tokens."""
    failed = []

    def oom_once(self, forward):
        if self.name == kind and not failed:
            failed.append(kind)
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        graph = EagerGraph(forward)
        return graph, graph.outputs

    monkeypatch.setattr(GraphCache, "capture", oom_once)
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_batch_size=8))
    engine = runtime.engine
    engine.runner.decoder.use_graphs = engine.runner.prefiller.use_graphs = True
    try:
        (first,) = run_together(runtime, [("hello world", None)], GenerationParams(max_new_tokens=4))
        assert isinstance(first[-1].error, ResourceExhausted)
        assert engine.runner.decoder.use_graphs and engine.runner.prefiller.use_graphs
        sink = Collector()
        engine.submit("next", runtime.tokenize("hello world"), GenerationParams(max_new_tokens=4), None, sink)
        assert sink.wait_end()[-1].token_ids == reference_greedy(tiny_model_dir, "hello world", None, 4)
    finally:
        runtime.close()
