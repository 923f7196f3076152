"""Admission into a prefill: prompts are padded to the longest of their prefill, and the prefill budget bounds
that padded area, so a long prompt is not prefilled together with short ones that would be mostly padding."""

from __future__ import annotations

import torch

from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import Collector, run_together


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


def test_a_base_request_is_not_held_behind_a_lora_request_waiting_for_a_slot(tiny_model_dir, adapter_root):
    """The issue's head-of-line case: one LoRA slot, four rows. A long LoRA request holds the slot, a second
    LoRA request (another adapter) waits for it, and a base request behind that one is admitted at once and
    finishes while the second LoRA request still waits."""
    long_new, short_new = 48, 6
    jobs = [("hello world", "lora-qv", long_new), ("你是谁？", "lora-rs", short_new), ("hi there", None, short_new)]
    refs = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, n) for p, a, n in jobs]
    assert len(refs[0]) == long_new  # no EOS: the first request really holds its slot for 48 steps
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(lora_slots=1, max_batch_size=4))
    log: list[tuple[str, str]] = []  # (request, event kind), in the order the engine thread emitted them
    sinks = []
    for i, (prompt, adapter_id, new_tokens) in enumerate(jobs):
        sink = Collector()
        sinks.append(sink)
        runtime.engine.submit(f"r{i}", runtime.tokenize(prompt), GenerationParams(max_new_tokens=new_tokens),
                              runtime.store.get(adapter_id) if adapter_id else None,
                              lambda event, rid=f"r{i}", sink=sink: (log.append((rid, event.kind)), sink(event)))
    runtime.engine.start()
    try:
        results = [s.wait_end() for s in sinks]
    finally:
        runtime.close()
    starts_and_ends = [entry for entry in log if entry[1] != "delta"]
    # r0 and r2 start together; r2 ends long before r0 frees the slot, and only then does r1 start.
    assert starts_and_ends == [("r0", "start"), ("r2", "start"), ("r2", "end"), ("r0", "end"), ("r1", "start"),
                               ("r1", "end")]
    for ref, events in zip(refs, results, strict=True):
        assert events[-1].token_ids == ref


def _serve_with_failing_acquire(tiny_model_dir, adapter_root, failure):
    """Serve three requests admitted in one step while the first slot acquisition for lora-rs ``failure()``s
    (returns what it returns, or raises); returns each request's events in submission order and the order in
    which they started."""
    jobs = [("hello world", None), ("你是谁？", "lora-qv"), ("hi there", "lora-rs")]
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(lora_slots=2))
    slots = runtime.engine.runner.slots
    real_acquire, failed = slots.acquire, []

    def acquire(key, weights):
        if key == runtime.store.get("lora-rs").key and not failed:
            failed.append(key)
            return failure()
        return real_acquire(key, weights)

    slots.acquire = acquire
    started: list[str] = []
    sinks = []
    for i, (prompt, adapter_id) in enumerate(jobs):
        sinks.append(Collector())
        runtime.engine.submit(f"r{i}", runtime.tokenize(prompt), GenerationParams(max_new_tokens=5),
                              runtime.store.get(adapter_id) if adapter_id else None,
                              lambda e, rid=f"r{i}", sink=sinks[-1]: (e.kind == "start" and started.append(rid),
                                                                       sink(e)))
    runtime.engine.start()
    try:
        results = [s.wait_end(timeout=20) for s in sinks]
        # Every slot is released at the end: both adapters can leave their slots.
        assert runtime.engine.call(lambda: [slots.evict(runtime.store.get(a).key) for _, a in jobs[1:]]).result(10) \
            == [True, True]
    finally:
        runtime.close()
    for (prompt, adapter_id), events in zip(jobs, results, strict=True):
        assert events[-1].token_ids == reference_greedy(tiny_model_dir, prompt,
                                                        adapter_root / adapter_id if adapter_id else None, 5)
    return started


def test_a_request_that_gets_no_slot_after_all_stays_queued(tiny_model_dir, adapter_root):
    """The scheduler counted a slot that the engine could not have: that request waits for the next step and
    the others go ahead."""
    assert _serve_with_failing_acquire(tiny_model_dir, adapter_root, lambda: None) == ["r0", "r1", "r2"]


def test_a_slot_fill_that_fails_loses_no_request(tiny_model_dir, adapter_root):
    """Out of device memory while filling a slot fails that step, but every request chosen in it is still
    queued (none lost, none left holding a slot twice) and served at the next step."""
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated while filling a LoRA slot)")

    assert _serve_with_failing_acquire(tiny_model_dir, adapter_root, out_of_memory) == ["r0", "r1", "r2"]
