"""Sampling parameters: seeds reproduce, filters hold, limits stop generation with the right reason."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest
import torch

from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.engine.observer import EngineObserver
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE
from tests.server.engine.test_parity import Collector

# The module's ``daemon`` is the session's shared one (tests/server/conftest.py): its one gRPC test only sends
# requests.
READS_ONLY = True


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, adapter_root):
    rt = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root, EngineConfig())
    rt.engine.start()
    yield rt
    rt.close()


def generate(runtime, prompt, params, adapter_id=None):
    sink = Collector()
    adapter = runtime.store.get(adapter_id) if adapter_id else None
    runtime.engine.submit(f"{id(sink)}", runtime.tokenize(prompt), params, adapter, sink)
    return sink.wait_end()


def test_same_seed_same_tokens_other_seed_other_tokens(runtime):
    params = GenerationParams(max_new_tokens=24, temperature=1.5, seed=7)
    first = generate(runtime, "hello", params)[-1].token_ids
    again = generate(runtime, "hello", params)[-1].token_ids
    other = generate(runtime, "hello", GenerationParams(max_new_tokens=24, temperature=1.5, seed=8))[-1].token_ids
    assert first == again
    assert first != other


def test_top_k_1_is_greedy(runtime):
    greedy = generate(runtime, "hello", GenerationParams(max_new_tokens=12))[-1].token_ids
    top1 = generate(runtime, "hello", GenerationParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=3))
    assert top1[-1].token_ids == greedy


def test_repetition_penalty_changes_greedy_output(runtime):
    plain = generate(runtime, "one two three", GenerationParams(max_new_tokens=30))[-1].token_ids
    penalised = generate(runtime, "one two three",
                         GenerationParams(max_new_tokens=30, repetition_penalty=5.0))[-1].token_ids
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


def test_max_tokens_and_min_tokens(runtime):
    events = generate(runtime, "hello", GenerationParams(max_new_tokens=5))
    assert events[-1].stop_reason == StopReason.MAX_TOKENS and events[-1].generated_token_count == 5
    assert events[0].kind == "start" and events[0].input_token_count == len(runtime.tokenize("hello"))


def test_eos_ends_the_answer_unless_min_new_tokens(runtime, tiny_model_dir, adapter_root):
    # with the "prefix" adapter this prompt's greedy answer reaches EOS after 3 tokens
    events = generate(runtime, "hello world", GenerationParams(max_new_tokens=10), "prefix")
    assert events[-1].stop_reason == StopReason.EOS_TOKEN
    n = events[-1].generated_token_count
    assert n < 10
    longer = generate(runtime, "hello world", GenerationParams(max_new_tokens=10, min_new_tokens=n + 2), "prefix")
    assert longer[-1].generated_token_count >= n + 2


def test_time_limit(runtime):
    # 5 ms: well under the time the tiny model takes to fill its context even on an H200 with decode graphs
    # (~0.3 ms a step there: a 0.3 s limit let it reach the context end first)
    events = generate(runtime, "hello", GenerationParams(max_new_tokens=100000, min_new_tokens=100000,
                                                         time_limit_s=0.005))
    assert events[-1].stop_reason == StopReason.TIME_LIMIT
    assert events[0].input_token_count + events[-1].generated_token_count < runtime.base.max_sequence_length


def test_context_limit_stops_with_token_limit(tiny_model_dir, adapter_root):
    rt = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32", 24), adapter_root, EngineConfig())
    rt.engine.start()
    try:
        events = generate(rt, "hello world", GenerationParams(max_new_tokens=100, min_new_tokens=100))
        assert events[-1].stop_reason == StopReason.TOKEN_LIMIT
        assert events[0].input_token_count + events[-1].generated_token_count <= 24
    finally:
        rt.close()


# Parameters below validation's bounds (an engine embedded without validation, or a bound that moves) and
# logits no model should give: the sampler still returns a token and never raises (on a GPU an invalid
# distribution is a device-side assert that ends the CUDA context for every request), and the rows beside
# that row choose what they choose alone.
EXTREME_PARAMS = [dict(temperature=1e-45), dict(temperature=1e-45, repetition_penalty=1e-45),
                  dict(temperature=1.0, repetition_penalty=1e-45), dict(temperature=100.0, top_p=1e-30, top_k=1),
                  dict(temperature=1e-45, top_k=3, top_p=0.5, min_new_tokens=5)]
EXTREME_LOGITS = {"huge": lambda v: torch.linspace(-3e38, 3e38, v), "tiny": lambda v: torch.full((v,), -3e38),
                  "inf": lambda v: torch.where(torch.arange(v) % 2 == 0, float("inf"), 1.0),
                  "nan": lambda v: torch.full((v,), float("nan")), "flat": lambda v: torch.zeros(v)}


@pytest.mark.parametrize("params", EXTREME_PARAMS)
@pytest.mark.parametrize("logits", sorted(EXTREME_LOGITS))
def test_sampler_fed_extreme_values_never_raises(params, logits):
    from adapterd.server.engine.sampling import BatchSampler, RowSampler

    vocab, device = 64, torch.device(TEST_DEVICE)
    extreme = GenerationParams(max_new_tokens=8, seed=1, **params)
    beside = [GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=8, temperature=0.7, seed=2)]
    normal = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0)).to(device)

    def run(rows, scores, steps=3):
        sampler = BatchSampler(4, vocab, {2}, device)
        sampler.place(0, [RowSampler(p, device) for p in rows], [[0, 3, 5, 63]] * len(rows))
        return [sampler.sample(0, scores.clone())[0] for _ in range(steps)]

    alone = [[step[0] for step in run([p], normal[i:i + 1])] for i, p in enumerate(beside)]
    together = run([beside[0], extreme, beside[1]],
                   torch.cat([normal[:1], EXTREME_LOGITS[logits](vocab)[None].to(device), normal[1:]]))
    assert all(0 <= step[1] < vocab for step in together)
    assert [[step[0] for step in together], [step[2] for step in together]] == alone


def test_extreme_sampling_row_does_not_disturb_the_others(runtime):
    """Past validation (the engine alone): temperature and penalty of 1e-45 give that row an answer, and the
    rows beside it give the tokens they give alone."""
    greedy = GenerationParams(max_new_tokens=12)
    alone = [generate(runtime, p, greedy)[-1].token_ids for p in ("hello", "one two three")]
    sinks = []
    for i, (prompt, params) in enumerate([("hello", greedy),
                                          ("what", GenerationParams(max_new_tokens=12, temperature=1e-45,
                                                                    repetition_penalty=1e-45, seed=1)),
                                          ("one two three", greedy)]):
        sink = Collector()
        runtime.engine.submit(f"extreme{i}", runtime.tokenize(prompt), params, None, sink)
        sinks.append(sink)
    ends = [s.wait_end()[-1] for s in sinks]
    assert ends[1].error is None and ends[1].stop_reason != StopReason.ERROR
    assert [ends[0].token_ids, ends[2].token_ids] == alone


def test_a_row_whose_sampling_raises_ends_alone(runtime, monkeypatch):
    """Whatever still makes one row's sampling raise ends that row (INVALID_ARGUMENT, field "sampling"), not
    the batch: the batch is sampled again row by row, and the rows beside it give the tokens they give alone."""
    from adapterd.server.engine import sampling

    greedy = GenerationParams(max_new_tokens=12)
    beside = GenerationParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5)
    jobs = [("hello", greedy), ("one two three", beside), ("hello world", greedy)]
    alone = [generate(runtime, prompt, params)[-1].token_ids for prompt, params in jobs]
    real = sampling.filter_top_k_top_p
    marked = []  # one entry per step that sampled the bad row (its top_p marks it)

    def filter_top_k_top_p(scores, top_k, top_p, *rest):
        if bool((top_p == 0.375).any()):
            marked.append(1)
            if len(marked) > 2:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(scores, top_k, top_p, *rest)

    monkeypatch.setattr(sampling, "filter_top_k_top_p", filter_top_k_top_p)
    bad = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.375, seed=13)
    ends = submit_together(runtime, [(prompt, params, None) for prompt, params in jobs[:1] + [("what", bad)]
                                     + jobs[1:]])
    assert ends[1].stop_reason == StopReason.ERROR and ends[1].generated_token_count == 2
    assert ends[1].error.code == grpc.StatusCode.INVALID_ARGUMENT and ends[1].error.field == "sampling"
    assert [ends[0].token_ids, ends[2].token_ids, ends[3].token_ids] == alone


def submit_together(runtime, jobs) -> list:
    """Submit (prompt, params, adapter id) jobs so that they are all admitted at the same step (the engine
    thread waits on a gate while they queue); the end event of each."""
    gate = threading.Event()
    runtime.engine.call(gate.wait)
    sinks = []
    for i, (prompt, params, adapter_id) in enumerate(jobs):
        sink = Collector()
        adapter = runtime.store.get(adapter_id) if adapter_id else None
        runtime.engine.submit(f"together{i}-{id(sink)}", runtime.tokenize(prompt), params, adapter, sink)
        sinks.append(sink)
    gate.set()
    return [s.wait_end()[-1] for s in sinks]


# A seeded request with every filter on, and requests of other kinds to share its batch: greedy and sampled,
# other seeds (one random), penalties, a minimum length, other adapters, and lengths that make them leave at
# different steps (the target's batch position moves as they do).
TARGET = ("hello world", GenerationParams(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95,
                                          repetition_penalty=1.1, seed=7), "lora-qv")
OTHERS = [("你是谁？", GenerationParams(max_new_tokens=12), None),
          ("one two three", GenerationParams(max_new_tokens=6, temperature=1.5, seed=1), "prefix"),
          ("Tell me a story", GenerationParams(max_new_tokens=20, temperature=1.0, top_p=0.5, seed=2), "team/lora-all"),
          ("What is 2 + 2?", GenerationParams(max_new_tokens=9, repetition_penalty=1.5), "lora-rs"),
          ("hello", GenerationParams(max_new_tokens=5, min_new_tokens=4, temperature=1.0, top_k=3, seed=3),
           "prefix-proj"),
          ("The quick brown fox", GenerationParams(max_new_tokens=14, temperature=0.3, seed=4), None),
          ("hi", GenerationParams(max_new_tokens=11, temperature=1.0), "lora-qv")]


@pytest.fixture(scope="module")
def target_alone(runtime) -> list[int]:
    tokens = submit_together(runtime, [TARGET])[0].token_ids
    assert len(tokens) == 16
    return tokens


@pytest.mark.parametrize("others", [1, 3, 7])
def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch(runtime, target_alone, others):
    ends = submit_together(runtime, OTHERS[:others // 2] + [TARGET] + OTHERS[others // 2:others])
    assert ends[others // 2].token_ids == target_alone
    assert all(end.stop_reason != StopReason.ERROR for end in ends)


class SubmitAtStep(EngineObserver):
    """Submits ``jobs`` from the engine thread after its ``step``-th decode step: they join a step later."""

    def __init__(self, runtime, step: int, jobs) -> None:
        self.runtime, self.step, self.jobs, self.steps = runtime, step, jobs, 0
        self.sinks: list[Collector] = []

    def decode_step(self, rows, seconds) -> None:
        self.steps += 1
        if self.steps == self.step:
            for i, (prompt, params, adapter_id) in enumerate(self.jobs):
                sink = Collector()
                adapter = self.runtime.store.get(adapter_id) if adapter_id else None
                self.runtime.engine.submit(f"late{i}-{id(sink)}", self.runtime.tokenize(prompt), params, adapter, sink)
                self.sinks.append(sink)


@pytest.mark.parametrize("target_joins", [True, False])
@pytest.mark.parametrize("step", [1, 4])
def test_a_seed_gives_the_same_tokens_joining_at_any_step(runtime, target_alone, target_joins, step):
    """The target joins a batch that has run ``step`` steps, or the others join the target's batch then."""
    first, late = (OTHERS, [TARGET]) if target_joins else ([TARGET], OTHERS)
    watch = SubmitAtStep(runtime, step, late)
    runtime.engine.observers.add(watch)
    try:
        ends = submit_together(runtime, first)
        ends += [sink.wait_end()[-1] for sink in watch.sinks]
    finally:
        runtime.engine.observers.observers.remove(watch)
    assert len(ends) == 1 + len(OTHERS)
    assert ends[len(OTHERS) if target_joins else 0].token_ids == target_alone


def test_a_seed_gives_the_same_answer_over_grpc_whatever_shares_the_batch(client):
    """End to end: the answer to a seeded request alone, beside seven concurrent others, and again with the
    seed a sampled request without one was given (the "start" seed)."""
    target = dict(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)
    alone = client.generate("hello world", "lora-qv", **target)
    assert alone.seed == 7 and alone.generated_token_count == 16
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(client.generate, prompt, adapter_id or "", max_new_tokens=p.max_new_tokens,
                              temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              repetition_penalty=p.repetition_penalty, seed=p.seed)
                  for prompt, p, adapter_id in OTHERS]
        together = pool.submit(client.generate, "hello world", "lora-qv", **target)
        answers = [f.result() for f in others]
    assert together.result().text == alone.text
    unseeded = answers[-1]
    assert unseeded.seed != 0
    again = client.generate("hi", "lora-qv", max_new_tokens=11, temperature=1.0, seed=unseeded.seed)
    assert again.text == unseeded.text


def test_the_start_event_reports_the_seed_used(runtime):
    """The given seed; a random 63-bit one for a sampled request without one (replaying it gives the same
    answer); 0 for greedy."""
    given = generate(runtime, "hello", GenerationParams(max_new_tokens=4, temperature=1.0, seed=2**63 - 5))
    drawn = generate(runtime, "hello", GenerationParams(max_new_tokens=8, temperature=1.0))
    greedy = generate(runtime, "hello", GenerationParams(max_new_tokens=4))
    assert given[0].kind == "start" and given[0].seed == 2**63 - 5
    assert 0 < drawn[0].seed < 2**63 and greedy[0].seed == 0
    replay = generate(runtime, "hello", GenerationParams(max_new_tokens=8, temperature=1.0, seed=drawn[0].seed))
    assert replay[-1].token_ids == drawn[-1].token_ids
