"""GenerateRequest -> GenerationParams, and chat messages checked. Every error is INVALID_ARGUMENT and names
its field."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from .adapters.ids import validate_adapter_id
from .engine import GenerationParams
from .errors import InvalidArgument

MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_CHARS = 240
MAX_PROMPT_CHARS = 1_000_000  # a cheap bound before tokenizing; the token limit is the real one
MAX_MESSAGES = 1000  # messages in one conversation: past any context a served model has
ROLES = ("system", "user", "assistant")  # what chat templates know; tool calls are not served
MAX_TEMPERATURE = 100.0
# Below 0.01 a temperature only turns logit gaps into overflow: at 0.01 a gap of 1 already weighs e^-100
# (sampling is greedy in all but name), and logits / 1e-45 are inf. 0 asks for greedy plainly.
MIN_TEMPERATURE = 0.01
MAX_REPETITION_PENALTY = 10.0
# A penalty divides seen tokens' positive logits: below 0.01 it multiplies them past 100x, which only makes
# them infinite (logit / 1e-45). 0 or 1 means off.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int  # the largest a request may ask
    default_max_new_tokens: int  # used when the request says 0
    max_input_tokens: int


def as_sent(bound: float) -> float:
    """``bound`` rounded to float32, as the wire carries it: a client sending 0.01 must pass ``>= 0.01``."""
    return struct.unpack("f", struct.pack("f", bound))[0]


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=field)
    return value


def validate_generate(request, limits: Limits) -> GenerationParams:
    """Check a GenerateRequest's fields; return the engine's parameters."""
    if request.prompt_token_ids:  # checked against the vocabulary and the limits where they are known
        if request.prompt or request.messages:
            raise InvalidArgument("send one of prompt, messages and prompt_token_ids", field="prompt_token_ids")
    else:
        check_text_or_messages(request.prompt, request.messages, "prompt")
    if request.adapter_id:
        validate_adapter_id(request.adapter_id)
    s, stop = request.sampling, request.stopping

    temperature = _finite(s.temperature, "sampling.temperature")
    if temperature != 0.0 and not as_sent(MIN_TEMPERATURE) <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
                              field="sampling.temperature")
    top_p = _finite(s.top_p, "sampling.top_p")
    if not 0.0 <= top_p <= 1.0:
        raise InvalidArgument("must be in [0, 1] (0 or 1 means off)", field="sampling.top_p")
    penalty = _finite(s.repetition_penalty, "sampling.repetition_penalty")
    if penalty != 0.0 and not as_sent(MIN_REPETITION_PENALTY) <= penalty <= MAX_REPETITION_PENALTY:
        raise InvalidArgument(f"must be 0 or 1 (off) or in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
                              field="sampling.repetition_penalty")
    if temperature == 0.0 and (s.top_k or (0.0 < top_p < 1.0)):
        raise InvalidArgument("top_k/top_p need a temperature above 0 (0 means greedy)", field="sampling.temperature")

    max_new = stop.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise InvalidArgument(f"must be at most {limits.max_new_tokens}", field="stopping.max_new_tokens")
    if stop.min_new_tokens > max_new:
        raise InvalidArgument(f"must not exceed max_new_tokens ({max_new})", field="stopping.min_new_tokens")
    if len(stop.stop_sequences) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} allowed", field="stopping.stop_sequences")
    for i, seq in enumerate(stop.stop_sequences):
        if not seq or len(seq) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(f"must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters",
                                  field=f"stopping.stop_sequences[{i}]")
    if request.truncate_input_tokens > limits.max_input_tokens:
        raise InvalidArgument(f"must be at most {limits.max_input_tokens}", field="truncate_input_tokens")

    return GenerationParams(
        max_new_tokens=max_new,
        min_new_tokens=stop.min_new_tokens,
        temperature=temperature,
        top_k=s.top_k,
        top_p=top_p if 0.0 < top_p < 1.0 else 1.0,
        repetition_penalty=penalty if penalty not in (0.0, 1.0) else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop_sequences=tuple(stop.stop_sequences),
        include_stop_sequence=stop.include_stop_sequence,
        time_limit_s=stop.time_limit_ms / 1000.0 if stop.time_limit_ms else None,
    )


def check_text_or_messages(text: str, messages, text_field: str) -> None:
    """Exactly one of a text (``prompt``, ``text``) and ``messages``, each within its bounds."""
    if text and messages:
        raise InvalidArgument(f"send {text_field} or messages, not both", field="messages")
    if messages:
        validate_messages([(m.role, m.content) for m in messages])
        return
    if not text:
        raise InvalidArgument("must not be empty (or send messages)", field=text_field)
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"longer than {MAX_PROMPT_CHARS} characters", field=text_field)


def validate_messages(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, content) pairs -> the messages a chat template takes. Roles are system, user, assistant; at
    most ``MAX_MESSAGES``, ``MAX_PROMPT_CHARS`` characters in all (the rendered prompt's token limit is
    checked after rendering)."""
    if not messages:
        raise InvalidArgument("must hold at least one message", field="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages are taken, not {len(messages)}", field="messages")
    total = 0
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(f"must be one of {', '.join(ROLES)}, not {role[:40]!r}", field=f"messages[{i}].role")
        total += len(content)
    if total > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"longer than {MAX_PROMPT_CHARS} characters in all", field="messages")
    return [{"role": role, "content": content} for role, content in messages]
