"""Admission into a prefill: prompts are padded to the longest of their prefill, and the prefill budget bounds
that padded area, so a long prompt is not prefilled together with short ones that would be mostly padding."""

from __future__ import annotations

from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import run_together


def test_the_budget_bounds_the_padded_prefill(tiny_model_dir, adapter_root):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    jobs = [(long_prompt, None), ("hello world", None), ("你是谁？", "lora-qv"), ("hi", "prefix")]
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_prefill_tokens=48))
    long_len = len(runtime.tokenize(long_prompt))
    assert 24 < long_len <= 48  # alone it fits; with any other prompt padded to it, it does not
    prefills = []

    class Watch(EngineObserver):
        def prefill_done(self, rows, prompt_tokens):
            prefills.append([r.request_id for r in rows])

    runtime.engine.observers.add(Watch())
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=4))
    finally:
        runtime.close()
    # Without the padded bound all four would go in one prefill of 4 x long_len token positions.
    assert prefills == [["r0"], ["r1", "r2", "r3"]]
    for (prompt, adapter), events in zip(jobs, results, strict=True):
        assert events[-1].token_ids == reference_greedy(tiny_model_dir, prompt,
                                                        adapter_root / adapter if adapter else None, 4)
