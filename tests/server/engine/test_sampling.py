"""Sampling parameters: seeds reproduce, filters hold, limits stop generation with the right reason."""

from __future__ import annotations

import grpc
import pytest
import torch

from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE
from tests.server.engine.test_parity import Collector


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
# distribution is a device-side assert that ends the CUDA context for every request).
EXTREME_PARAMS = [dict(temperature=1e-45), dict(temperature=1e-45, repetition_penalty=1e-45),
                  dict(temperature=1.0, repetition_penalty=1e-45), dict(temperature=100.0, top_p=1e-30, top_k=1),
                  dict(temperature=1e-45, top_k=3, top_p=0.5, min_new_tokens=5)]
EXTREME_LOGITS = {"huge": lambda v: torch.linspace(-3e38, 3e38, v), "tiny": lambda v: torch.full((v,), -3e38),
                  "inf": lambda v: torch.where(torch.arange(v) % 2 == 0, float("inf"), 1.0),
                  "nan": lambda v: torch.full((v,), float("nan")), "flat": lambda v: torch.zeros(v)}


@pytest.mark.parametrize("params", EXTREME_PARAMS)
@pytest.mark.parametrize("logits", sorted(EXTREME_LOGITS))
def test_sampler_fed_extreme_values_never_raises(params, logits):
    from adapterd.server.engine.sampling import RowSampler

    vocab = 64
    sampler = RowSampler(GenerationParams(max_new_tokens=8, seed=1, **params), {2}, torch.device(TEST_DEVICE))
    scores = EXTREME_LOGITS[logits](vocab).to(TEST_DEVICE)
    seen = torch.tensor([[0, 3, 5, 63]], device=TEST_DEVICE)
    for generated in range(3):
        assert 0 <= sampler.next_token(scores.clone(), seen, generated) < vocab


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
    the batch: the rows beside it give the tokens they give alone."""
    from adapterd.server.engine.sampling import RowSampler

    greedy = GenerationParams(max_new_tokens=12)
    alone = [generate(runtime, p, greedy)[-1].token_ids for p in ("hello", "one two three")]
    real = RowSampler.next_token

    def next_token(self, logits, seen_ids, generated):
        if self.params.seed == 13 and generated == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(self, logits, seen_ids, generated)

    monkeypatch.setattr(RowSampler, "next_token", next_token)
    sinks = []
    for i, (prompt, params) in enumerate([("hello", greedy), ("what", GenerationParams(max_new_tokens=12,
                                                                                      temperature=1.0, seed=13)),
                                          ("one two three", greedy)]):
        sink = Collector()
        runtime.engine.submit(f"raises{i}", runtime.tokenize(prompt), params, None, sink)
        sinks.append(sink)
    ends = [s.wait_end()[-1] for s in sinks]
    assert ends[1].stop_reason == StopReason.ERROR and ends[1].generated_token_count == 2
    assert ends[1].error.code == grpc.StatusCode.INVALID_ARGUMENT and ends[1].error.field == "sampling"
    assert [ends[0].token_ids, ends[2].token_ids] == alone
