"""The engine's greedy tokens equal PEFT's for each prompt and adapter alone, whatever shares the batch."""

from __future__ import annotations

import queue

import pytest

from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy

PROMPTS = ["hello world", "你是谁？", "The quick brown fox jumps", "Tell me a story about a robot."]
ADAPTERS = [None, "lora-qv", "team/lora-all", "lora-rs", "prefix", "prefix-proj"]
NEW_TOKENS = 10


class Collector:
    """A sink that records one request's events."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def wait_end(self, timeout: float = 60.0):
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if event.kind == "end":
                return seen


def prefill_kinds(runtime: Runtime) -> list[set[str]]:
    """A list the engine fills, one entry per prefill: the kinds of its rows (BASE, LORA, PREFIX_TUNING)."""
    kinds: list[set[str]] = []

    class Watch(EngineObserver):
        def prefill_done(self, rows, prompt_tokens):
            kinds.append({r.adapter.type if r.adapter else "BASE" for r in rows})

    runtime.engine.observers.add(Watch())
    return kinds


def submit_all(runtime: Runtime, jobs) -> list[Collector]:
    """Submit each ``(prompt, adapter id or None, params)`` of ``jobs``; their sinks, in order."""
    sinks = []
    for i, (prompt, adapter_id, params) in enumerate(jobs):
        sink = Collector()
        adapter = runtime.store.get(adapter_id) if adapter_id else None
        runtime.engine.submit(f"r{i}", runtime.tokenize(prompt), params, adapter, sink)
        sinks.append(sink)
    return sinks


def run_together(runtime: Runtime, jobs, params: GenerationParams):
    """Submit every job before the engine starts, so that they all share the first batch."""
    sinks = submit_all(runtime, [(prompt, adapter_id, params) for prompt, adapter_id in jobs])
    runtime.engine.start()
    return [s.wait_end() for s in sinks]


@pytest.fixture(scope="module", params=["none", "int8"])
def references(request, tiny_model_dir, adapter_root):
    q = request.param
    refs = {(p, a): reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, NEW_TOKENS, q)
            for p in PROMPTS for a in ADAPTERS}
    return q, refs


# "exact": prefill and decode shapes fit the batch; "bucketed": padded to the CUDA graphs' bucket shapes
# (padding rows, padded prompts, padding key/value columns, a rank bucket), which is what a GPU replays; on a
# GPU both run in graphs.
DECODE_MODES = ["exact", "bucketed"]


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_mixed_batch_matches_peft_alone(references, decode, tiny_model_dir, adapter_root):
    quantization, refs = references
    runtime = Runtime(_load(tiny_model_dir, quantization), adapter_root, EngineConfig(max_batch_size=64))
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = decode == "bucketed"
    observed = prefill_kinds(runtime)
    general = []
    real_general = runtime.engine.runner.prefiller.through_cache
    runtime.engine.runner.prefiller.through_cache = (  # must not be needed: every shape fits the pool
        lambda prompts, *rest: (general.append(len(prompts)), real_general(prompts, *rest))[1])
    jobs = [(p, a) for p in PROMPTS for a in ADAPTERS]
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=NEW_TOKENS))
    finally:
        runtime.close()
    assert observed[0] == {"BASE", "LORA", "PREFIX_TUNING"}, "all kinds of rows must share one batch"
    assert not general, "prefix rows too are prefilled straight into the pool"
    mismatches = [(job, events[-1].token_ids, refs[job]) for job, events in zip(jobs, results, strict=True)
                  if events[-1].token_ids != refs[job]]
    assert not mismatches
    # every row still produced something different from the base for at least some adapters
    assert len({tuple(refs[("hello world", a)]) for a in ADAPTERS}) == len(ADAPTERS)


def _load(model_dir, quantization):
    from adapterd.server.model import load_base_model

    return load_base_model(model_dir, quantization, TEST_DEVICE, "float32")


def test_rows_joining_a_running_batch_keep_their_tokens(tiny_model_dir, adapter_root):
    """Requests that arrive while others decode join at the next step; nobody's tokens change."""
    runtime = Runtime(_load(tiny_model_dir, "none"), adapter_root, EngineConfig())
    runtime.engine.start()
    try:
        long = Collector()
        runtime.engine.submit("long", runtime.tokenize("hello world"), GenerationParams(max_new_tokens=40),
                              runtime.store.get("lora-qv"), long)
        first = long.events.get(timeout=30)  # "start": the long request is running
        assert first.kind == "start"
        late = []
        for i, adapter_id in enumerate(["prefix", None, "team/lora-all"]):
            sink = Collector()
            adapter = runtime.store.get(adapter_id) if adapter_id else None
            runtime.engine.submit(f"late{i}", runtime.tokenize("你是谁？"), GenerationParams(max_new_tokens=8),
                                  adapter, sink)
            late.append((adapter_id, sink))
        long_tokens = long.wait_end()[-1].token_ids
        for adapter_id, sink in late:
            adapter_dir = adapter_root / adapter_id if adapter_id else None
            expected = reference_greedy(tiny_model_dir, "你是谁？", adapter_dir, 8)
            assert sink.wait_end()[-1].token_ids == expected, adapter_id
        assert long_tokens == reference_greedy(tiny_model_dir, "hello world", adapter_root / "lora-qv", 40)
    finally:
        runtime.close()


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_rows_leaving_out_of_order_keep_the_others_tokens(decode, tiny_model_dir, adapter_root):
    """Rows finish at different steps; each leaving row's place in the key/value pool is taken by the last
    row, whose entries move. Every row's tokens still equal PEFT's for its prompt and adapter alone."""
    runtime = Runtime(_load(tiny_model_dir, "none"), adapter_root, EngineConfig())
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = decode == "bucketed"
    jobs = [(p, a, 3 + 4 * (i % 4)) for i, (p, a) in enumerate((p, a) for a in ADAPTERS for p in PROMPTS[:2])]
    sinks = submit_all(runtime, [(p, a, GenerationParams(max_new_tokens=n)) for p, a, n in jobs])
    runtime.engine.start()
    try:
        got = [sink.wait_end()[-1].token_ids for sink in sinks]
    finally:
        runtime.close()
    for (prompt, adapter_id, n), tokens in zip(jobs, got, strict=True):
        adapter_dir = adapter_root / adapter_id if adapter_id else None
        assert tokens == reference_greedy(tiny_model_dir, prompt, adapter_dir, n), (prompt, adapter_id, n)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_a_minimum_length_bans_eos_as_transformers_does(decode, tiny_model_dir, adapter_root):
    """Rows with ``min_new_tokens`` share a batch with rows without: each row's tokens are transformers' + PEFT's
    for its prompt and adapter alone with ``MinNewTokensLengthLogitsProcessor`` (EOS at -inf until that many
    tokens), whether the decode step's pick bans EOS (greedy rows) or the sampler does (a penalised row beside
    them sends the whole step there). With the "prefix" adapter "hello world" reaches EOS after a few tokens,
    so the ban changes its answer."""
    plain_eos = reference_greedy(tiny_model_dir, "hello world", adapter_root / "prefix", NEW_TOKENS)
    jobs = [("hello world", "prefix", 6), ("hello world", "prefix", 0), ("hello world", None, 3),
            ("你是谁？", "lora-qv", 0), ("hello world", "prefix", len(plain_eos) + 1)]
    want = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, NEW_TOKENS, min_new_tokens=m)
            for p, a, m in jobs]
    assert len(plain_eos) < 6 <= len(want[0]) and want[1] == plain_eos  # the ban matters for these rows
    for penalised in (False, True):
        runtime = Runtime(_load(tiny_model_dir, "none"), adapter_root, EngineConfig())
        runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = decode == "bucketed"
        sinks = submit_all(runtime, [(p, a, GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=least))
                                     for p, a, least in jobs] + ([("hello", None, GenerationParams(
                                         max_new_tokens=NEW_TOKENS, repetition_penalty=1.5))] if penalised else []))
        runtime.engine.start()
        try:
            got = [sink.wait_end()[-1].token_ids for sink in sinks[:len(jobs)]]
        finally:
            runtime.close()
        assert got == want, penalised


def test_the_one_launch_pick_gives_the_same_tokens_in_the_engine(tiny_model_dir, adapter_root, monkeypatch):
    """The decode step's pick through ``kernels/greedy_pick.py`` (Triton's interpreter here; on a GPU it is the
    default), run ahead and bucketed as a GPU runs it: rows with and without a minimum length give transformers'
    + PEFT's tokens, the kernel called at every decode step."""
    pytest.importorskip("triton")
    from adapterd.server.kernels import greedy_pick as greedy_kernel

    jobs = [("hello world", "prefix", 6), ("hello world", "prefix", 0), ("The quick brown fox jumps", None, 2)]
    want = [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, NEW_TOKENS, min_new_tokens=m)
            for p, a, m in jobs]
    runtime = Runtime(_load(tiny_model_dir, "none"), adapter_root, EngineConfig())
    step = runtime.engine.runner.decoder
    step.bucketed = runtime.engine.runner.prefiller.bucketed = True
    calls = []
    if TEST_DEVICE == "cpu":  # read at each call: only the pick runs in the interpreter (compiled on a GPU)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    step._pick = lambda *a: calls.append(1) or greedy_kernel.greedy_pick(*a)
    sinks = submit_all(runtime, [(p, a, GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=least))
                                 for p, a, least in jobs])
    runtime.engine.start()
    try:
        got = [sink.wait_end()[-1].token_ids for sink in sinks]
    finally:
        runtime.close()
    # on the CPU the pick is called at every decode step; on a GPU at each decode graph's capture, then replayed
    assert got == want and len(calls) >= (NEW_TOKENS - 1 if TEST_DEVICE == "cpu" else 1)
    assert runtime.engine.steps_run_ahead > 0


def test_cancel_frees_the_row_at_the_next_step(tiny_model_dir, adapter_root):
    runtime = Runtime(_load(tiny_model_dir, "none"), adapter_root, EngineConfig())
    runtime.engine.start()
    try:
        sink = Collector()
        runtime.engine.submit("c", runtime.tokenize("hello"), GenerationParams(max_new_tokens=400, min_new_tokens=400),
                              runtime.store.get("lora-qv"), sink)
        assert sink.events.get(timeout=30).kind == "start"
        sink.events.get(timeout=30)  # one token out: it is decoding
        runtime.engine.cancel("c")
        events = sink.wait_end()
        assert events[-1].stop_reason == StopReason.CANCELLED
        assert events[-1].generated_token_count < 400
        assert runtime.engine.call(lambda: len(runtime.engine.batch)).result(10) == 0
        # its LoRA slot is no longer pinned: the adapter can be evicted
        key = runtime.store.get("lora-qv").key
        assert runtime.engine.call(lambda: runtime.engine.runner.slots.evict(key)).result(10)
    finally:
        runtime.close()


def test_a_shape_past_the_pool_takes_the_general_prefill(tiny_model_dir, adapter_root):
    """Bucketed (as on a GPU), a long prompt behind a prefix pads past the context (prompt bucket + prefix
    bucket > 64 entries): that prefill goes through the transient cache instead, with the same tokens, and
    a short one beside it still goes straight into the pool."""
    from adapterd.server.model import load_base_model

    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32", 64), adapter_root,
                      EngineConfig())
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = True
    general = []
    real = runtime.engine.runner.prefiller.through_cache  # the general prefill path (runner.py)
    runtime.engine.runner.prefiller.through_cache = lambda prompts, *rest: (general.append(len(prompts)),
                                                                            real(prompts, *rest))[1]
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    assert 33 <= len(runtime.tokenize(long_prompt)) <= 64 - 6 - 4  # bucket 64, plus a prefix bucket of 8
    try:
        (long,) = run_together(runtime, [(long_prompt, "prefix")], GenerationParams(max_new_tokens=4))
        assert general == [1]
        short = Collector()
        runtime.engine.submit("short", runtime.tokenize("hello world"), GenerationParams(max_new_tokens=4),
                              runtime.store.get("prefix"), short)
        short_tokens = short.wait_end()[-1].token_ids
        assert general == [1]
    finally:
        runtime.close()
    assert long[-1].token_ids == reference_greedy(tiny_model_dir, long_prompt, adapter_root / "prefix", 4)
    assert short_tokens == reference_greedy(tiny_model_dir, "hello world", adapter_root / "prefix", 4)
