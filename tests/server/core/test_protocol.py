"""What crosses the process boundary: plain data in a typed schema, domain errors kept, anything else refused."""

from __future__ import annotations

import msgspec
import pytest

from adapterd.server.core.protocol import (
    Cancel,
    Event,
    Outputs,
    Submit,
    encoder,
    engine_event,
    event_message,
    from_core,
    rebuild_error,
    to_core,
)
from adapterd.server.engine.request import GenerationEvent, GenerationParams, StopReason
from adapterd.server.errors import FailedPrecondition, NotFound


def test_a_submit_round_trips_with_every_parameter():
    params = GenerationParams(max_new_tokens=7, min_new_tokens=2, temperature=0.7, top_k=5, top_p=0.9,
                              repetition_penalty=1.2, seed=42, stop_sequences=("a", "bc"),
                              include_stop_sequence=True, time_limit_s=1.5)
    message = Submit("req/1", [1, 2, 3], params, "team/lora")
    assert to_core.decode(encoder.encode(message)) == message


def test_frames_that_are_not_our_messages_are_refused_not_run():
    import pickle

    for frame in (pickle.dumps(Submit("r", [1], GenerationParams(max_new_tokens=1))), b"\x00garbage",
                  encoder.encode({"type": "Submit", "request_id": "r"}),  # fields missing
                  encoder.encode(Outputs([]))):  # a core->front end message sent the wrong way
        with pytest.raises(msgspec.DecodeError):
            to_core.decode(frame)
    with pytest.raises(msgspec.DecodeError):
        from_core.decode(encoder.encode(Cancel("r")))


def test_events_keep_domain_errors_and_hide_unexpected_ones():
    failed = GenerationEvent("end", stop_reason=StopReason.ERROR,
                             error=FailedPrecondition("holds NaN", field="adapter_id"))
    back = engine_event(from_core.decode(encoder.encode(Outputs([event_message("r", failed)]))).events[0])
    assert isinstance(back.error, FailedPrecondition) and back.error.field == "adapter_id"
    assert back.error.message == "holds NaN" and back.stop_reason == StopReason.ERROR
    bug = engine_event(event_message("r", GenerationEvent("end", error=KeyError("/secret/path"))))
    assert isinstance(bug.error, RuntimeError) and "/secret/path" not in str(bug.error)


def test_a_reply_rebuilds_the_error_class_by_name_only_among_domain_errors():
    assert isinstance(rebuild_error(_info("NotFound")), NotFound)
    assert isinstance(rebuild_error(_info("SystemExit")), RuntimeError)  # never an arbitrary class


def test_a_delta_carries_its_tokens_and_an_end_counts_them():
    delta = engine_event(Event("r", "delta", [5, 6]))
    end = engine_event(Event("r", "end", [5, 6, 7], stop_reason=int(StopReason.MAX_TOKENS)))
    assert delta.token_ids == [5, 6] and end.generated_token_count == 3 and end.stop_reason == StopReason.MAX_TOKENS


def _info(kind: str):
    from adapterd.server.core.protocol import ErrorInfo

    return ErrorInfo(kind, "m", "f")


def test_a_domain_error_subclass_defined_elsewhere_keeps_its_status_code():
    from adapterd.server.core.protocol import error_info

    class NonFiniteAdapter(FailedPrecondition):  # as a module outside server/errors.py may define
        pass

    back = rebuild_error(error_info(NonFiniteAdapter("holds NaN", field="adapter_id")))
    assert type(back) is FailedPrecondition and back.field == "adapter_id"
