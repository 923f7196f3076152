"""OpenAI request bodies -> the daemon's ``GenerateRequest``, so that HTTP goes through the same validation,
limits and generation path as gRPC (``service.generation_events``, ``validation.validate_generate``).

Only the parameter types and what OpenAI's API allows but the daemon does not serve are checked here; every
range (temperature, top_p, max_tokens against ``--max-new-tokens``, stop sequences...) is checked once, by
``validate_generate``, whose field names ``OPENAI_FIELDS`` turns back into the request's parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...v1 import adapterd_pb2 as pb
from ..errors import InvalidArgument

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a request without one samples
MAX_SEED = 2**64 - 1  # the seed is a uint64 on the wire
# validate_generate's field -> the OpenAI parameter a client sent (prefixes: "stopping.stop_sequences[2]").
OPENAI_FIELDS = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
                 "sampling.repetition_penalty": "repetition_penalty", "stopping.max_new_tokens": "max_tokens",
                 "stopping.stop_sequences": "stop", "stopping.min_new_tokens": "min_tokens", "adapter_id": "model"}
# Parameters OpenAI defines that the daemon does not serve, with the value that means "not used".
UNSERVED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "logprobs": None,
            "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
            "echo": False, "suffix": None, "best_of": 1}


def openai_field(field: str | None) -> str | None:
    """The OpenAI parameter name for a field named by the daemon's validation."""
    if field is None:
        return None
    for ours, theirs in OPENAI_FIELDS.items():
        if field == ours or field.startswith(ours + "["):
            return theirs + field[len(ours):]
    return field


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    request: pb.GenerateRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "an object"}


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` if it is one of ``kinds`` (JSON's true is not an integer here), ``default`` when absent
    or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = ["a number"] if float in kinds else [_KIND_NAMES[k] for k in kinds]
        raise InvalidArgument(f"must be {' or '.join(names)}", field=name)
    return value


def _refuse_unserved(body: dict[str, Any]) -> None:
    for name, unused in UNSERVED.items():
        value = body.get(name)
        if value is not None and value != unused and value not in ({}, [], False):
            raise InvalidArgument("is not supported by this server", field=name)
    if _typed(body, "n", (int,), 1) != 1:
        raise InvalidArgument("must be 1 (one choice per request)", field="n")
    response_format = _typed(body, "response_format", (dict,), {})
    if response_format.get("type", "text") != "text":
        raise InvalidArgument("only text is supported", field="response_format")


def _stops(body: dict[str, Any]) -> list[str]:
    stop = _typed(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    for i, item in enumerate(stops):
        if not isinstance(item, str):
            raise InvalidArgument("must be a string", field=f"stop[{i}]")
    return stops


def _generate_request(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> pb.GenerateRequest:
    temperature = _typed(body, "temperature", (int, float), OPENAI_DEFAULT_TEMPERATURE)
    top_p = _typed(body, "top_p", (int, float), 1.0)
    sampling = pb.SamplingParameters(
        temperature=temperature, top_k=_count(body, "top_k"),
        # Greedy ignores the nucleus (as OpenAI's API does) rather than refusing a client that sends both.
        top_p=top_p if temperature else 1.0,
        repetition_penalty=_typed(body, "repetition_penalty", (int, float), 0.0))
    seed = _typed(body, "seed", (int,))
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"must be in [0, {MAX_SEED}]", field="seed")
        sampling.seed = seed
    max_tokens = 0
    for name in max_tokens_names:
        max_tokens = max_tokens or _count(body, name, minimum=1)
    # min_tokens: vLLM's extension (EOS held back until then), gRPC's stopping.min_new_tokens.
    stopping = pb.StoppingCriteria(max_new_tokens=max_tokens, min_new_tokens=_count(body, "min_tokens"),
                                   stop_sequences=_stops(body))
    return pb.GenerateRequest(adapter_id="", sampling=sampling, stopping=stopping)


def _count(body: dict[str, Any], name: str, minimum: int = 0) -> int:
    """A whole-number parameter (0 when absent), at least ``minimum`` and within the wire's uint32."""
    value = _typed(body, name, (int,), 0)
    if value and not minimum <= value < 2**32 or value < 0:
        raise InvalidArgument(f"must be a whole number from {minimum}", field=name)
    return value


def _common(body: Any) -> tuple[str, bool, bool]:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", field="body")
    model = _typed(body, "model", (str,))
    if not model:
        raise InvalidArgument("must name the base model or an adapter (GET /v1/models lists them)", field="model")
    _refuse_unserved(body)
    options = _typed(body, "stream_options", (dict,), {})
    return model, bool(_typed(body, "stream", (bool,), False)), bool(options.get("include_usage"))


def _content(content: Any, field: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument("only text parts are supported", field=f"{field}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument("must be a string or a list of text parts", field=field)


def chat_request(body: Any, adapter_of: Any) -> ParsedRequest:
    """``POST /v1/chat/completions``. ``adapter_of(model)`` gives the adapter id ("" for the base)."""
    model, stream, usage = _common(body)
    messages = _typed(body, "messages", (list,))
    if not messages:
        raise InvalidArgument("must hold at least one message", field="messages")
    request = _generate_request(body, ("max_completion_tokens", "max_tokens"))
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument("must be an object with role and content", field=f"messages[{i}]")
        role = message.get("role")
        # OpenAI's newer name for the system role.
        role = "system" if role == "developer" else role
        request.messages.add(role=role if isinstance(role, str) else "",
                             content=_content(message.get("content", ""), f"messages[{i}].content"))
    request.adapter_id = adapter_of(model)
    return ParsedRequest(model, request, stream, usage)


def completion_request(body: Any, adapter_of: Any) -> ParsedRequest:
    """``POST /v1/completions``: the prompt is sent as is (no template), like gRPC's ``prompt``; one prompt,
    as a string or as token ids (``[1, 2]`` or ``[[1, 2]]``, gRPC's ``prompt_token_ids``)."""
    model, stream, usage = _common(body)
    prompt = _one_prompt(_typed(body, "prompt", (str, list)))
    request = _generate_request(body, ("max_tokens",))
    if isinstance(prompt, list):
        request.prompt_token_ids.extend(prompt)
    else:
        request.prompt = prompt or ""
    request.adapter_id = adapter_of(model)
    return ParsedRequest(model, request, stream, usage)


def _one_prompt(prompt: str | list | None) -> str | list[int] | None:
    """OpenAI's prompt forms: a string, token ids, or a batch of one of either (batches are not served)."""
    if not isinstance(prompt, list):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
        return prompt
    raise InvalidArgument("must be one string or one list of token ids (batches are not supported)", field="prompt")
