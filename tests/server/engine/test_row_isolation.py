"""Numeric isolation inside the engine: non-finite values injected straight into one row's LoRA slot or its
key/value pool row end that row alone (ERROR, FAILED_PRECONDITION), and every other row of the batch gives
exactly the tokens it gives when served alone. Runs on TEST_DEVICE (ADAPTERD_TEST_DEVICE=cuda on a GPU,
with CUDA graphs and the fused kernels on)."""

from __future__ import annotations

import grpc
import pytest
import torch

from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE
from tests.server.engine.test_parity import Collector

NEW_TOKENS = 10
# The bad row first: it is pool row 0, so when it leaves, the batch's last row moves into its pool row.
BAD = ("Tell me about the sea", "lora-qv")
INNOCENT = [("hello world", ""), ("你是谁？", "team/lora-all"), ("one two three four", "lora-rs"),
            ("Tell me a story", "prefix"), ("What is 2 + 2?", ""), ("hello world", "prefix-proj")]


@pytest.fixture()
def base(tiny_model_dir):
    """The model directory: each runtime loads its own base (the LoRA tables wrap the base's layers)."""
    return tiny_model_dir


def _runtime(base, adapter_root, bucketed: bool = False) -> Runtime:
    # 3 LoRA slots for 3 LoRA adapters: every forward with LoRA rows takes the dense path (all slots read).
    model = load_base_model(base, "none", TEST_DEVICE, "float32")
    runtime = Runtime(model, adapter_root, EngineConfig(lora_slots=3, max_batch_size=16))
    # "bucketed": the shapes a GPU replays (padding rows, padded prompts, padding key/value columns) also on
    # the CPU; on a GPU both modes run in CUDA graphs.
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = bucketed
    return runtime


def _submit(runtime: Runtime, jobs, params: GenerationParams) -> list[Collector]:
    sinks = []
    for prompt, adapter_id in jobs:
        sink = Collector()
        adapter = runtime.store.get(adapter_id) if adapter_id else None
        runtime.engine.submit(f"r{id(sink)}", runtime.tokenize(prompt), params, adapter, sink)
        sinks.append(sink)
    return sinks


@pytest.fixture(scope="module")
def solo(tiny_model_dir, adapter_root) -> dict:
    """Each innocent request's tokens when it is the only request."""
    runtime = _runtime(tiny_model_dir, adapter_root)
    runtime.engine.start()
    try:
        return {job: _submit(runtime, [job], GenerationParams(max_new_tokens=NEW_TOKENS))[0].wait_end()[-1].token_ids
                for job in INNOCENT}
    finally:
        runtime.close()


class PoisonAfterPrefill(EngineObserver):
    """Calls ``poison(row_index)`` for the bad row once, right after the first prefill (engine thread)."""

    def __init__(self, poison) -> None:
        self.poison = poison
        self.done = False

    def prefill_done(self, rows, prompt_tokens):
        if not self.done:
            self.done = True
            self.poison(rows[0])


def _run_poisoned(base, adapter_root, poison, bucketed: bool) -> tuple[list, dict]:
    runtime = _runtime(base, adapter_root, bucketed)
    runtime.engine.observers.add(PoisonAfterPrefill(lambda row: poison(runtime, row)))
    try:
        # Submitted before the engine starts: every request is admitted into the first prefill, in order.
        # The bad row would leave after 2 tokens anyway: its pool row is handed over early either way.
        sinks = (_submit(runtime, [BAD], GenerationParams(max_new_tokens=2))
                 + _submit(runtime, INNOCENT, GenerationParams(max_new_tokens=NEW_TOKENS)))
        runtime.engine.start()
        ends = [s.wait_end()[-1] for s in sinks]
        after = {job: _submit(runtime, [job], GenerationParams(max_new_tokens=NEW_TOKENS))[0].wait_end()[-1].token_ids
                 for job in INNOCENT}
    finally:
        runtime.close()
    return ends, after


def _check(ends, after, solo) -> None:
    for job, end in zip(INNOCENT, ends[1:], strict=True):
        assert end.error is None and end.stop_reason != StopReason.ERROR, job
        assert end.token_ids == solo[job], job
    assert after == solo  # and later requests too: nothing of the bad row stayed behind
    bad = ends[0]
    assert bad.stop_reason == StopReason.ERROR
    assert bad.error is not None and bad.error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "non-finite" in bad.error.message and "lora-qv" in bad.error.message


@pytest.mark.parametrize("bucketed", [False, True])
def test_inf_in_a_lora_slot_ends_its_row_alone(base, adapter_root, solo, bucketed):
    """+inf in the bad row's slot of every lora_A table: x @ A is inf for every row in the dense path, and
    0 x inf = NaN, so a one-hot multiply would poison every row; the select keeps it in its own row."""
    def poison(runtime, row):
        for layer in runtime.engine.runner.slots.layers.values():
            layer.lora_a[0, row.slot, 0] = float("inf")

    _check(*_run_poisoned(base, adapter_root, poison, bucketed), solo)


@pytest.mark.parametrize("bucketed", [False, True])
def test_nan_left_in_a_pool_row_is_never_read_by_its_next_owner(base, adapter_root, solo, bucketed):
    """NaN in every entry of the bad row's pool row (what an adapter that overflows writes there): the row
    ends, the batch's last row moves into its pool row and reads past its own entries (masked, but 0 x NaN =
    NaN), so those must have been zeroed."""
    def poison(runtime, row):
        pool = runtime.engine.runner.pool
        for store in pool.keys + pool.values:
            store[0].fill_(float("nan"))  # pool row 0: the bad row, admitted first
        pool.touch(0, 1, pool.capacity)  # as a forward writing there would have recorded

    _check(*_run_poisoned(base, adapter_root, poison, bucketed), solo)


def test_freed_slot_is_zeroed(base, adapter_root):
    runtime = _runtime(base, adapter_root)
    try:
        adapter = runtime.store.get("lora-qv")
        slot = runtime.engine.runner.slots.acquire(adapter.key, adapter.lora)
        layers = runtime.engine.runner.slots.layers.values()
        assert any(bool(layer.lora_a[:, slot].abs().sum() > 0) for layer in layers)
        runtime.engine.runner.slots.release(slot)
        assert runtime.engine.runner.slots.evict(adapter.key)
        assert all(not layer.lora_a[:, slot].any() and not layer.lora_b[:, slot].any() for layer in layers)
    finally:
        runtime.close()


def test_pool_release_and_move_zero_what_the_owner_does_not_hold():
    from adapterd.server.engine.kv_pool import KvPool

    pool = KvPool(1, 1, 2, torch.float32, torch.device("cpu"), max_rows=4, max_capacity=16, rows=4, capacity=16)
    pool.touch(0, 2, 8)
    for store in pool.keys + pool.values:
        store[:2, :, :8] = float("nan")
        store[1, :, :3] = 1.0
    pool.move(1, 0, 3)  # row 1's three entries into row 0: row 0 keeps nothing of its old NaN past them
    pool.release(1)
    for store in pool.keys + pool.values:
        assert torch.equal(store[0, :, :3], torch.ones(1, 3, 2)) and not store[0, :, 3:].any()
        assert not store[1].any()
    pool.touch(2, 1, 16)  # a general prefill's row joins where a forward left NaN: it keeps only its own
    for store in pool.keys + pool.values:
        store[2] = float("nan")
    pool.put(2, [(torch.full((1, 5, 2), 2.0), torch.full((1, 5, 2), 2.0))])
    for store in pool.keys + pool.values:
        assert torch.equal(store[2, :, :5], torch.full((1, 5, 2), 2.0)) and not store[2, :, 5:].any()


def test_a_failed_prefill_leaves_nothing_in_the_pool(base, adapter_root, solo):
    """A prefill that fails (out of memory, say) after writing its rows' entries, NaN among them: those rows
    never joined the batch, and the requests admitted next into the same pool rows must not read them."""
    runtime = _runtime(base, adapter_root)
    engine = runtime.engine
    real = engine.runner.prefiller.run
    armed = [True]

    def run(first, prompts, slots, prefixes):
        logits = real(first, prompts, slots, prefixes)
        if armed:
            armed.clear()
            for row in range(first, first + len(prompts)):  # what a poisoned prompt would have left: NaN in
                for store in engine.runner.pool.keys + engine.runner.pool.values:  # every entry its forward wrote
                    store[row, :, :engine.runner.pool.used[row]] = float("nan")
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return logits

    engine.runner.prefiller.run = run
    try:
        long_prompt = " ".join(["sea"] * 60)  # longer than every innocent prompt: its entries reach past theirs
        failed = _submit(runtime, [(long_prompt, "lora-qv")] * 3, GenerationParams(max_new_tokens=4))
        engine.start()
        assert all(s.wait_end()[-1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED for s in failed)
        sinks = _submit(runtime, INNOCENT, GenerationParams(max_new_tokens=NEW_TOKENS))
        assert [s.wait_end()[-1].token_ids for s in sinks] == [solo[job] for job in INNOCENT]
    finally:
        runtime.close()


class _PoolStorageOutOfMemory:
    """Stands for ``torch`` in ``kv_pool``: making the pool's storage past ``capacity`` entries a row runs
    out of device memory, as growing it for one long prompt can on a full GPU; everything else is torch's."""

    def __init__(self, pool) -> None:
        self.pool, self.capacity = pool, pool.capacity

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def zeros(self, shape, **kwargs):
        pool = self.pool
        if (len(shape) >= 4 and (shape[-3], shape[-1]) == (pool.kv_heads, pool.head_dim)  # [..., heads, entries,
                and shape[-2] > self.capacity):                                            # dim]: the storage
            raise torch.OutOfMemoryError("CUDA out of memory (simulated while growing the key/value pool)")
        return torch.zeros(shape, **kwargs)


class SubmitAfterFirstPrefill(EngineObserver):
    """Submits ``submit()`` once the first prefill is done: its request then meets a running batch."""

    def __init__(self, submit) -> None:
        self.submit, self.done = submit, False

    def prefill_done(self, rows, prompt_tokens):
        if not self.done:
            self.done = True
            self.submit()


def test_a_prompt_the_pool_cannot_grow_for_ends_that_request_alone(base, adapter_root, solo, monkeypatch):
    """One tenant's long prompt needs the key/value pool to grow past what the device holds. That request ends
    with RESOURCE_EXHAUSTED; the row already running goes on to the tokens it gives alone (a half-made
    allocation replaced none of the pool's storage), and the engine serves the long prompt once memory allows."""
    from adapterd.server.engine import kv_pool

    runtime = _runtime(base, adapter_root)
    engine, pool = runtime.engine, runtime.engine.runner.pool
    storage = [t.shape for t in pool.keys + pool.values]
    monkeypatch.setattr(kv_pool, "torch", _PoolStorageOutOfMemory(pool))
    long_prompt = " ".join(["sea"] * (pool.capacity + 40))  # past the pool's entries a row
    assert len(runtime.tokenize(long_prompt)) > pool.capacity
    running_job = INNOCENT[1]
    late: list[Collector] = []
    engine.observers.add(SubmitAfterFirstPrefill(
        lambda: late.extend(_submit(runtime, [(long_prompt, "lora-rs")], GenerationParams(max_new_tokens=4)))))
    try:
        running = _submit(runtime, [running_job], GenerationParams(max_new_tokens=NEW_TOKENS))
        engine.start()
        assert running[0].wait_end()[-1].token_ids == solo[running_job]
        end = late[0].wait_end()[-1]
        assert end.stop_reason == StopReason.ERROR and end.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [t.shape for t in pool.keys + pool.values] == storage
        monkeypatch.undo()  # the memory is there again
        again = _submit(runtime, [(long_prompt, "lora-rs")], GenerationParams(max_new_tokens=4))
        assert again[0].wait_end()[-1].generated_token_count == 4
    finally:
        runtime.close()


class SubmitWhenLong(EngineObserver):
    """Submits ``submit()`` once, when the batch's first row holds ``length`` entries (engine thread)."""

    def __init__(self, length: int, submit) -> None:
        self.length, self.submit, self.done = length, submit, False

    def decode_step(self, rows, seconds):
        if not self.done and rows and rows[0].kv_len >= self.length:
            self.done = True
            self.submit()


def test_a_generation_the_pool_cannot_grow_for_ends_that_request_alone(base, adapter_root, solo, monkeypatch):
    """A long generation reaches the pool's entries a row while another request runs beside it, and growing
    the pool (for every row) runs out of device memory: the long one ends with RESOURCE_EXHAUSTED, and the
    other goes on to the tokens it gives alone."""
    from adapterd.server.engine import kv_pool

    runtime = _runtime(base, adapter_root)
    engine, pool = runtime.engine, runtime.engine.runner.pool
    capacity = pool.capacity
    monkeypatch.setattr(kv_pool, "torch", _PoolStorageOutOfMemory(pool))
    beside_job = INNOCENT[2]
    beside: list[Collector] = []
    engine.observers.add(SubmitWhenLong(capacity - 4, lambda: beside.extend(
        _submit(runtime, [beside_job], GenerationParams(max_new_tokens=NEW_TOKENS)))))
    try:
        long = _submit(runtime, [("hello world", "")], GenerationParams(max_new_tokens=capacity + 20,
                                                                         min_new_tokens=capacity + 20))
        engine.start()
        end = long[0].wait_end()[-1]
        assert end.stop_reason == StopReason.ERROR and end.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert capacity - 8 < end.generated_token_count < capacity  # it ran until the pool was full
        assert beside[0].wait_end()[-1].token_ids == solo[beside_job]
        assert pool.capacity == capacity
    finally:
        runtime.close()


@pytest.mark.slow  # ~35 s each on the CPU: the kernels in Triton's interpreter, four PEFT references
@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_inf_in_a_lora_slot_stays_in_its_row_inside_the_split_k_kernels_shared_launches(quantization, tiny_model_dir,
                                                                                        adapter_root, monkeypatch):
    """Decode steps at the defaults run every row's LoRA shrink as extra programs of the layer's own split-K matmul
    launch (``int8_shrink.IN_MATMUL``; a float base's matmuls through that kernel by ``dense_splitk.IN_DECODE``),
    o_proj's shrink in the attention's merge and, over int8, its delta's sums in o_proj's launch
    (``int8_expand.IN_MATMUL``): programs of every row share one launch. +inf in the bad row's slot of every lora_A
    table (its adapter wraps every linear) ends that row alone, and each other row (LoRA on q and v, on q and o, a
    base row, a prefix row) still gives PEFT's tokens for it alone over the same base (int8 layers, or fp32)."""
    pytest.importorskip("triton")
    from adapterd.server.kernels import decode_attention, dense_splitk, int8_expand, int8_shrink
    from tests.helpers import reference_greedy
    from tests.server.engine.test_parity import run_together

    assert int8_shrink.IN_MATMUL and int8_expand.IN_MATMUL and dense_splitk.IN_DECODE  # the defaults under test
    assert not int8_expand.FLOAT_IN_MATMUL
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(decode_attention, "faster_than_sdpa", lambda *_: True)  # the merge takes o_proj's shrink
    bad, innocent = ("Tell me about the sea", "team/lora-all"), [
        ("hello world", "lora-qv"), ("你是谁？", "lora-rs"), ("What is 2 + 2?", None), ("hello world", "prefix")]
    new = 4
    refs = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, new, quantization)
            for p, a in innocent]
    runtime = Runtime(load_base_model(tiny_model_dir, quantization, TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_batch_size=8, fused_kernels=True))
    assert quantization != "int8" or runtime.engine.runner.int8_kernel_layers > 0
    shrinks, expands = [], []
    real_shrink, real_expand = int8_shrink.matmul_and_shrink, int8_expand.matmul_and_expand
    monkeypatch.setattr(int8_shrink, "matmul_and_shrink", lambda *a: shrinks.append(r := real_shrink(*a)) or r)
    monkeypatch.setattr(int8_expand, "matmul_and_expand", lambda *a: expands.append(r := real_expand(*a)) or r)

    def poison(row):
        for layer in runtime.engine.runner.slots.layers.values():
            layer.lora_a[0, row.slot, 0] = float("inf")

    runtime.engine.observers.add(PoisonAfterPrefill(poison))
    try:
        ends = [events[-1] for events in run_together(runtime, [bad, *innocent], GenerationParams(max_new_tokens=new))]
    finally:
        runtime.close()
    if TEST_DEVICE == "cpu":  # (a GPU runs them where its buckets are tuned and, for a float base, judged)
        assert shrinks and all(s is not None for s in shrinks)  # every shrink in its matmul's launch
        assert (quantization == "int8") == bool(expands) and all(e is not None for e in expands)  # o_proj's sums
    assert [end.token_ids for end in ends[1:]] == refs
    assert all(end.error is None for end in ends[1:])
    assert ends[0].stop_reason == StopReason.ERROR and ends[0].error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "non-finite" in ends[0].error.message and "team/lora-all" in ends[0].error.message
