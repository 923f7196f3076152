"""What the HTTP front end answers: OpenAI's response and chunk objects, and errors in OpenAI's shape.

Errors keep gRPC's semantics: a domain error (``server/errors.py``) gets the HTTP status that google.rpc's
mapping gives its code (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503...),
its message (server directories redacted as in gRPC) and the field at fault as ``param``, in OpenAI's JSON
(``{"error": {"message", "type", "param", "code"}}``), which the official clients turn into their
``BadRequestError``, ``NotFoundError``... Anything else is 500 with an error id, its traceback in the log only.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc

from ..engine import StopReason
from ..errors import AdapterdError
from ..rpc_errors import internal_message, is_domain_error, log_unexpected, redact
from .requests import openai_field

# google.rpc.Code -> HTTP status, as google/rpc/code.proto documents each code.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNKNOWN: 500, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# HTTP status -> OpenAI's error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}
# The engine's stop reasons -> OpenAI's finish_reason.
FINISH_REASONS = {StopReason.EOS_TOKEN: "stop", StopReason.STOP_SEQUENCE: "stop", StopReason.MAX_TOKENS: "length",
                  StopReason.TOKEN_LIMIT: "length", StopReason.TIME_LIMIT: "length"}


def error_body(status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_of(exc: BaseException, where: str, correlation_id: str | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for ``exc`` (module docstring)."""
    if is_domain_error(exc):
        assert isinstance(exc, AdapterdError)
        status = HTTP_STATUS.get(exc.code, 500)
        param = openai_field(exc.field)
        message = redact(f"{param}: {exc.message}" if param else exc.message)
        code = "model_not_found" if status == 404 and param == "model" else exc.code.name.lower()
        return status, error_body(status, message, param, code)
    ident = log_unexpected(exc, where, correlation_id)
    return 500, error_body(500, internal_message(ident), None, "internal")


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str, finish_reason: str | None, *, delta: bool = False,
           first: bool = False) -> dict[str, Any]:
    """One choice (index 0): a chat message or delta, or a completion's text."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def completion(chat: bool, ident: str, model: str, choices: list[dict[str, Any]], *, chunk: bool = False,
               counts: dict[str, int] | None = None) -> dict[str, Any]:
    """A whole answer, or one chunk of a stream (``chunk``), as OpenAI's objects are laid out."""
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    body: dict[str, Any] = {"id": ident, "object": kind, "created": int(time.time()), "model": model,
                            "choices": choices, "system_fingerprint": None}
    if counts is not None:
        body["usage"] = counts
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def finish_reason(stop_reason: int) -> str:
    return FINISH_REASONS.get(StopReason(stop_reason), "stop")
