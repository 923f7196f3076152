"""Property-based tests of request validation (``validate_generate``): whatever a client sends, the answer is
either parameters within the daemon's limits or INVALID_ARGUMENT naming a field that exists in the request,
never another exception; a request within the documented bounds is always accepted; and a request with one
field pushed out of bounds is refused naming exactly that field."""

from __future__ import annotations

import math
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from adapterd.server import validation as v
from adapterd.server.errors import InvalidArgument
from adapterd.v1 import adapterd_pb2 as pb

UINT32 = 2**32 - 1
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)  # proto float is 32-bit
ANY_TEXT = st.text(max_size=300)

limits_st = st.builds(
    lambda max_new, default, max_input: v.Limits(max_new_tokens=max_new, default_max_new_tokens=min(default, max_new),
                                                 max_input_tokens=max_input),
    st.integers(1, 4096), st.integers(1, 4096), st.integers(1, 32768))


def field_exists(path: str, request: pb.GenerateRequest) -> bool:
    """True if ``path`` (``stopping.stop_sequences[2]``) names a field of GenerateRequest, with any index
    inside the repeated field's length in ``request``."""
    descriptor, message = pb.GenerateRequest.DESCRIPTOR, request
    for part in path.split("."):
        match = re.fullmatch(r"([a-z_]+)(?:\[(\d+)\])?", part)
        if match is None or descriptor is None or match.group(1) not in descriptor.fields_by_name:
            return False
        field = descriptor.fields_by_name[match.group(1)]
        value = getattr(message, field.name)
        if match.group(2) is not None:
            if not field.is_repeated or int(match.group(2)) >= len(value):
                return False
        descriptor, message = field.message_type, value
    return True


def _mostly(plausible: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Values near the valid range most of the time, anything the wire allows otherwise: purely random
    requests would almost all fail on their first field and never reach the later checks."""
    return st.one_of(plausible, plausible, plausible, wild)


@st.composite
def any_request(draw) -> pb.GenerateRequest:
    greedy = draw(st.booleans())
    sampling = pb.SamplingParameters(
        temperature=draw(_mostly(st.just(0.0) if greedy else st.floats(0, 2, width=32), FLOATS)),
        top_k=draw(_mostly(st.just(0) if greedy else st.integers(0, 100), st.integers(0, UINT32))),
        top_p=draw(_mostly(st.sampled_from([0.0, 1.0]) if greedy else st.floats(0, 1, width=32), FLOATS)),
        repetition_penalty=draw(_mostly(st.floats(0, 3, width=32), FLOATS)))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    stopping = pb.StoppingCriteria(
        max_new_tokens=draw(_mostly(st.integers(0, 300), st.integers(0, UINT32))),
        min_new_tokens=draw(_mostly(st.integers(0, 20), st.integers(0, UINT32))),
        stop_sequences=draw(st.lists(_mostly(st.text(min_size=1, max_size=20), st.text(max_size=260)), max_size=8)),
        include_stop_sequence=draw(st.booleans()), time_limit_ms=draw(st.integers(0, UINT32)))
    adapter = draw(_mostly(st.just("") | st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_\-]{1,8})?", fullmatch=True),
                           st.from_regex(r"[A-Za-z0-9_.\-/]{1,20}", fullmatch=True) | ANY_TEXT))
    return pb.GenerateRequest(prompt=draw(_mostly(st.text(min_size=1, max_size=100), ANY_TEXT)),
                              adapter_id=adapter, sampling=sampling, stopping=stopping,
                              truncate_input_tokens=draw(_mostly(st.integers(0, 2000), st.integers(0, UINT32))))


def check_within_limits(params, request: pb.GenerateRequest, limits: v.Limits) -> None:
    s, stop = request.sampling, request.stopping
    assert 1 <= params.max_new_tokens <= limits.max_new_tokens
    assert params.max_new_tokens == (stop.max_new_tokens or limits.default_max_new_tokens)
    assert 0 <= params.min_new_tokens <= params.max_new_tokens
    assert math.isfinite(params.temperature) and 0.0 <= params.temperature <= v.MAX_TEMPERATURE
    assert 0.0 < params.top_p <= 1.0 and math.isfinite(params.repetition_penalty)
    assert v.MIN_REPETITION_PENALTY * 0.999 < params.repetition_penalty <= v.MAX_REPETITION_PENALTY
    assert params.temperature == 0.0 or params.temperature > v.MIN_TEMPERATURE * 0.999
    if params.temperature == 0.0:
        assert params.top_k == 0 and params.top_p == 1.0  # greedy means no filters
    assert len(params.stop_sequences) <= v.MAX_STOP_SEQUENCES
    assert all(1 <= len(x) <= v.MAX_STOP_SEQUENCE_CHARS for x in params.stop_sequences)
    assert params.time_limit_s is None or params.time_limit_s > 0
    assert params.seed == (s.seed if s.HasField("seed") else None)
    assert request.prompt and request.truncate_input_tokens <= limits.max_input_tokens


@settings(max_examples=600, deadline=None)
@given(request=any_request(), limits=limits_st)
def test_any_request_is_accepted_within_limits_or_refused_naming_a_real_field(request, limits):
    try:
        params = v.validate_generate(request, limits)
    except InvalidArgument as exc:
        assert exc.field and field_exists(exc.field, request), exc.field
        assert exc.message
        return
    check_within_limits(params, request, limits)
    assert v.validate_generate(request, limits) == params  # deterministic


@st.composite
def valid_request(draw, limits: v.Limits) -> pb.GenerateRequest:
    """A request inside every documented bound."""
    temperature = draw(st.just(0.0) | st.floats(v.as_sent(v.MIN_TEMPERATURE), v.MAX_TEMPERATURE, width=32))
    sampling = pb.SamplingParameters(
        temperature=temperature, top_k=draw(st.integers(0, UINT32)) if temperature else 0,
        top_p=draw(st.floats(0.0, 1.0, width=32)) if temperature else draw(st.sampled_from([0.0, 1.0])),
        repetition_penalty=draw(st.just(0.0) | st.floats(v.as_sent(v.MIN_REPETITION_PENALTY),
                                                          v.MAX_REPETITION_PENALTY, width=32)))
    max_new = draw(st.integers(0, limits.max_new_tokens))
    stopping = pb.StoppingCriteria(
        max_new_tokens=max_new, min_new_tokens=draw(st.integers(0, max_new or limits.default_max_new_tokens)),
        stop_sequences=draw(st.lists(st.text(min_size=1, max_size=v.MAX_STOP_SEQUENCE_CHARS),
                                     max_size=v.MAX_STOP_SEQUENCES)),
        time_limit_ms=draw(st.integers(0, UINT32)))
    return pb.GenerateRequest(
        prompt=draw(st.text(min_size=1, max_size=200)),
        adapter_id=draw(st.just("") | st.from_regex(r"[a-z0-9_][a-z0-9_\-]{0,10}(/[a-z0-9_][a-z0-9_\-]{0,10}){0,2}",
                                                     fullmatch=True)),
        sampling=sampling, stopping=stopping, truncate_input_tokens=draw(st.integers(0, limits.max_input_tokens)))


# field path -> a change that puts that one field out of bounds
BREAKERS = {
    "prompt": lambda r, lim: setattr(r, "prompt", ""),
    "adapter_id": lambda r, lim: setattr(r, "adapter_id", "../escape"),
    "sampling.temperature": lambda r, lim: setattr(r.sampling, "temperature", -1.0),
    "sampling.top_p": lambda r, lim: setattr(r.sampling, "top_p", 1.5),
    "sampling.repetition_penalty": lambda r, lim: setattr(r.sampling, "repetition_penalty", math.inf),
    "stopping.max_new_tokens": lambda r, lim: setattr(r.stopping, "max_new_tokens", lim.max_new_tokens + 1),
    "stopping.min_new_tokens": lambda r, lim: setattr(
        r.stopping, "min_new_tokens", (r.stopping.max_new_tokens or lim.default_max_new_tokens) + 1),
    "stopping.stop_sequences": lambda r, lim: r.stopping.stop_sequences.extend(
        ["x"] * (v.MAX_STOP_SEQUENCES + 1 - len(r.stopping.stop_sequences))),
    "truncate_input_tokens": lambda r, lim: setattr(r, "truncate_input_tokens", lim.max_input_tokens + 1),
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), limits=limits_st, broken=st.sampled_from(sorted(BREAKERS)))
def test_valid_requests_pass_and_one_bad_field_is_named(data, limits, broken):
    request = data.draw(valid_request(limits))
    check_within_limits(v.validate_generate(request, limits), request, limits)
    BREAKERS[broken](request, limits)
    try:
        v.validate_generate(request, limits)
    except InvalidArgument as exc:
        assert exc.field == broken, (exc.field, broken)
    else:
        raise AssertionError(f"{broken} out of bounds was accepted")


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, v.MAX_STOP_SEQUENCES - 1), bad=st.just("") | st.text(
    min_size=v.MAX_STOP_SEQUENCE_CHARS + 1, max_size=v.MAX_STOP_SEQUENCE_CHARS + 20))
def test_a_bad_stop_sequence_is_named_by_its_index(index, bad):
    request = pb.GenerateRequest(prompt="hi")
    request.stopping.stop_sequences.extend(["ok"] * index + [bad])
    try:
        v.validate_generate(request, v.Limits(64, 16, 128))
    except InvalidArgument as exc:
        assert exc.field == f"stopping.stop_sequences[{index}]" and field_exists(exc.field, request)
    else:
        raise AssertionError("accepted")
