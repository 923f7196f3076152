"""The output stage (engine/output.py): token events in, the caller's text events out, with stop sequences
found across token boundaries and the whole text equal to the tokenizer's decoding."""

from __future__ import annotations

from transformers import AutoTokenizer

from adapterd.server.engine.output import RequestOutput
from adapterd.server.engine.request import GenerationEvent, GenerationParams, StopReason


def _run(tokenizer, ids: list[int], params: GenerationParams, per_delta: int = 1) -> list[GenerationEvent]:
    """Feed ``ids`` as the engine would: deltas of ``per_delta`` tokens, the last one only in "end"."""
    output = RequestOutput(tokenizer, params)
    shown = [output.process(GenerationEvent("start", input_token_count=3))]
    body, last = ids[:-1], ids
    for i in range(0, len(body), per_delta):
        shown.append(output.process(GenerationEvent("delta", token_ids=body[i:i + per_delta])))
    shown.append(output.process(GenerationEvent("end", token_ids=last, stop_reason=StopReason.MAX_TOKENS)))
    return [e for e in shown if e is not None]


def test_the_text_is_the_tokenizers_decoding_and_the_engines_reason_is_kept(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("你是谁？ The quick brown fox", add_special_tokens=False).input_ids
    for per_delta in (1, 3):
        events = _run(tok, ids, GenerationParams(max_new_tokens=len(ids)), per_delta)
        assert "".join(e.text for e in events) == tok.decode(ids, skip_special_tokens=True)
        assert events[-1].kind == "end" and events[-1].stop_reason == StopReason.MAX_TOKENS
        assert events[-1].token_ids == ids and events[-1].generated_token_count == len(ids)


def test_a_stop_sequence_ends_the_request_for_its_caller_and_later_tokens_are_never_shown(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("one two three four five", add_special_tokens=False).input_ids
    events = _run(tok, ids, GenerationParams(max_new_tokens=len(ids), stop_sequences=("three",)), per_delta=2)
    end = events[-1]
    assert end.kind == "end" and end.stop_reason == StopReason.STOP_SEQUENCE and end.stop_sequence == "three"
    assert "".join(e.text for e in events) == "one two "
    assert "four" not in "".join(e.text for e in events)
    assert sum(e.kind == "end" for e in events) == 1  # the engine's own end, arriving later, is dropped
    assert end.generated_token_count == len(end.token_ids) < len(ids)


def test_an_error_end_keeps_its_error(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    output = RequestOutput(tok, GenerationParams(max_new_tokens=4))
    error = RuntimeError("device failed")
    end = output.process(GenerationEvent("end", stop_reason=StopReason.ERROR, error=error))
    assert end.error is error and end.stop_reason == StopReason.ERROR and end.text == ""
