"""Running a decode step ahead (delivery.py): step N+1 is launched with step N's tokens still on the device, and
rows that step N ends run one step too many. What a client sees must not change: the same tokens as PEFT alone
and as the engine without running ahead, rows ending by end of sequence, by length and by the context limit at
the same token, and the steps really launched ahead."""

from __future__ import annotations

import pytest

from adapterd.server.engine import EngineConfig, GenerationParams, StopReason
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import Collector, run_together

JOBS = [("hello world", None), ("你是谁？", "lora-qv"), ("hi there", "prefix"), ("The quick brown fox", "lora-rs")]
NEW_TOKENS = 12


def _serve(tiny_model_dir, adapter_root, run_ahead: bool, eos: set[int], jobs=JOBS, params=None, limit=None):
    """Each job's events, all admitted in one prefill, with ``eos`` as extra end-of-sequence ids; and the
    number of steps launched ahead."""
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32", *([limit] if limit else []))
    runtime = Runtime(base, adapter_root, EngineConfig(run_ahead=run_ahead))
    runtime.engine.eos_ids = set(runtime.engine.eos_ids) | eos
    try:
        results = run_together(runtime, jobs, params or GenerationParams(max_new_tokens=NEW_TOKENS))
        return results, runtime.engine.steps_run_ahead
    finally:
        runtime.close()


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapter_root):
    return [reference_greedy(tiny_model_dir, p, adapter_root / a if a else None, NEW_TOKENS) for p, a in JOBS]


def test_rows_ended_by_their_token_mid_batch_keep_every_other_row_exact(tiny_model_dir, adapter_root, references):
    # End of sequence chosen among the tokens PEFT gives: row 0 ends at its 4th token, and any other row that
    # would give that id ends there too, while the rest run on past a step they shared with the ended rows.
    eos = {references[0][3]}
    expected = [_cut(ref, eos) for ref in references]
    assert len(expected[0]) == 3 and any(len(e) > 4 for e in expected)
    ahead, launched_ahead = _serve(tiny_model_dir, adapter_root, True, eos)
    behind, none_ahead = _serve(tiny_model_dir, adapter_root, False, eos)
    assert launched_ahead > 0 and none_ahead == 0
    for want, got_ahead, got_behind in zip(expected, ahead, behind, strict=True):
        assert got_ahead[-1].token_ids == want
        assert [e.token_ids for e in got_ahead] == [e.token_ids for e in got_behind]  # every event, in order
        assert got_ahead[-1].stop_reason == got_behind[-1].stop_reason
    assert ahead[0][-1].stop_reason == StopReason.EOS_TOKEN


def test_rows_ending_by_length_end_at_the_same_token(tiny_model_dir, adapter_root, references):
    params = GenerationParams(max_new_tokens=5, min_new_tokens=5)
    ahead, launched_ahead = _serve(tiny_model_dir, adapter_root, True, set(), params=params)
    assert launched_ahead > 0
    for ref, events in zip(references, ahead, strict=True):
        assert events[-1].stop_reason == StopReason.MAX_TOKENS
        assert events[-1].token_ids[:len(ref[:5])] == ref[:5] and len(events[-1].token_ids) == 5


@pytest.mark.parametrize("run_ahead", [True, False])
def test_the_context_limit_ends_a_row_at_the_same_token(tiny_model_dir, adapter_root, run_ahead):
    jobs = [("hello world", None), ("hi", "lora-qv")]
    params = GenerationParams(max_new_tokens=100, min_new_tokens=100)
    results, launched_ahead = _serve(tiny_model_dir, adapter_root, run_ahead, set(), jobs, params, limit=24)
    assert (launched_ahead > 0) == run_ahead
    for events in results:
        assert events[-1].stop_reason == StopReason.TOKEN_LIMIT
        # The last position a row may feed is 23: its prompt and generated tokens fill the 24 exactly.
        assert events[0].input_token_count + events[-1].generated_token_count == 24


def test_a_call_between_steps_sees_no_step_in_flight(tiny_model_dir, adapter_root):
    """``Engine.call`` runs with every token read: the rows' host state is the device's."""
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root, EngineConfig())
    sink = Collector()
    runtime.engine.submit("r0", runtime.tokenize("hello world"),
                          GenerationParams(max_new_tokens=200, min_new_tokens=200), None, sink)
    runtime.engine.start()
    try:
        seen = []
        for _ in range(5):
            seen.append(runtime.engine.call(
                lambda: (runtime.engine._in_flight is None,
                         [len(r.generated) + len(r.prompt_ids) for r in runtime.engine.batch.rows],
                         [r.kv_len for r in runtime.engine.batch.rows])).result(30))
        sink.wait_end()
    finally:
        runtime.close()
    for settled, fed, kv in seen:
        assert settled
        # Each generated token but the last is in the cache, after the prompt: nothing launched is unread.
        assert all(k == f - 1 for k, f in zip(kv, fed, strict=True)) or not kv


def test_a_row_whose_sampling_fails_ends_alone_while_the_step_after_runs(tiny_model_dir, adapter_root, references,
                                                                         monkeypatch):
    """Row 1's sampling raises at the second decode step: the step after it is already launched, fed the
    row's failed token (-1, in range for the embedding); the row ends alone with INVALID_ARGUMENT naming
    ``sampling``, its earlier tokens kept, and the other rows give PEFT's tokens. The rows sample from their top
    1 token (PEFT's greedy token, drawn), which keeps them off greedy's path, where the step's own pick is the
    token and no sampling op runs that could fail."""
    from adapterd.server.engine.sampling import BatchSampler

    real, batched = BatchSampler.choose, []

    def choose(self, first, logits):
        if logits.shape[0] > 1:
            batched.append(first)
        if len(batched) == 3 and (logits.shape[0] > 1 or first == 1):  # the prefill's, then two decode steps
            raise RuntimeError("a sampling failure of row 1")
        return real(self, first, logits)

    monkeypatch.setattr(BatchSampler, "choose", choose)
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1, seed=1)
    results, launched_ahead = _serve(tiny_model_dir, adapter_root, True, set(), params=params)
    assert launched_ahead > 0
    for i, (ref, events) in enumerate(zip(references, results, strict=True)):
        if i == 1:
            assert events[-1].stop_reason == StopReason.ERROR and events[-1].token_ids == ref[:2]
            assert events[-1].error.field == "sampling"
        else:
            assert events[-1].token_ids == ref


def test_seeded_sampled_rows_draw_the_same_tokens_ahead_or_not(tiny_model_dir, adapter_root, references):
    """Sampled rows (temperature, top-k, repetition penalty, each its own seed) beside rows that end by end of
    sequence mid-batch: each row's draws come from its own generator, so running ahead (one extra draw for an
    ended row) changes no other row's tokens."""
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=20, repetition_penalty=1.2, seed=5)
    free, _ = _serve(tiny_model_dir, adapter_root, False, set(), params=params)
    eos = {free[0][-1].token_ids[3]}  # row 0 draws it 4th: it ends there, the others run on past it or end too
    ahead, launched_ahead = _serve(tiny_model_dir, adapter_root, True, eos, params=params)
    behind, _ = _serve(tiny_model_dir, adapter_root, False, eos, params=params)
    assert launched_ahead > 0 and ahead[0][-1].stop_reason == StopReason.EOS_TOKEN
    assert any(len(r[-1].token_ids) > 4 for r in ahead)
    assert [[e.token_ids for e in r] for r in ahead] == [[e.token_ids for e in r] for r in behind]
    assert [r[-1].stop_reason for r in ahead] == [r[-1].stop_reason for r in behind]
