"""Turning the daemon's errors into gRPC statuses: one mapping for every handler.

A domain error (``AdapterdError`` with a specific code) becomes its status, with a ``google.rpc.BadRequest``
detail naming the field that grpcio-status clients can read. Anything else (a bug, a library's exception,
a bare ``AdapterdError`` whose code is INTERNAL) becomes INTERNAL with a short generic message and an error
id; the traceback and the original text go to the log under that id, never to the client, whose message
could otherwise carry a server path or a traceback. grpc's own abort exception and ``asyncio.CancelledError``
pass through untouched: the first has already sent its status, the second is the client leaving.

Domain messages may quote a server directory (``no run 'x' under /srv/runs``): the directories the daemon
registers with ``hide_paths`` are replaced by their names (``<runs root>``) in every message.

Handlers are wrapped by ``unary`` or ``streaming``; ``server/limits.py`` applies ``abort_unexpected`` to the
handlers of the other services (health, reflection) too.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import AdapterdError

log = logging.getLogger(__name__)

# The exception grpc.aio raises from ``context.abort``: the status has been sent, so let it unwind as is.
ABORTED = (grpc.aio.AbortError,)
# Server directory -> the name a client sees instead; longest first, so that a nested one wins.
_HIDDEN: dict[str, str] = {}


def hide_paths(paths: dict[str, os.PathLike | str | None]) -> None:
    """Register server directories (``{"<adapter root>": "/srv/adapters"}``) to keep out of messages."""
    for name, path in paths.items():
        if path is not None:
            for spelling in {os.fspath(path), os.path.realpath(path)}:
                _HIDDEN[spelling.rstrip("/") or "/"] = name
    ordered = sorted(_HIDDEN.items(), key=lambda item: -len(item[0]))
    _HIDDEN.clear()
    _HIDDEN.update(ordered)


def redact(message: str) -> str:
    for path, name in _HIDDEN.items():
        if len(path) > 1:
            message = message.replace(path, name)
    return message


def status_of(exc: AdapterdError) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, exc.code.name), message=redact(str(exc)))
    if exc.field:
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=redact(exc.message))])
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def is_domain_error(exc: BaseException) -> bool:
    """A domain error with a code of its own: its message is written for the caller. A bare AdapterdError
    (code INTERNAL) wraps something unexpected (a worker's stderr, say) and is treated as unexpected."""
    return isinstance(exc, AdapterdError) and exc.code != grpc.StatusCode.INTERNAL


def error_id() -> str:
    """A short id that ties a client's INTERNAL message to the server's log line."""
    return uuid.uuid4().hex[:12]


def internal_message(ident: str) -> str:
    return f"internal error (error id {ident}); the server log has the details"


def log_unexpected(exc: BaseException, method: str, correlation_id: str | None = None) -> str:
    """Log ``exc`` with its traceback under a new error id (and the client's correlation id); return the id."""
    ident = error_id()
    log.error("%s failed (error id %s, correlation id %s)", method, ident, correlation_id or "-",
              exc_info=(type(exc), exc, exc.__traceback__))
    return ident


def correlation_id(context: grpc.aio.ServicerContext) -> str | None:
    """The client's ``x-correlation-id`` metadata, at most 128 characters."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-correlation-id" and value:
            return str(value)[:128]
    return None


async def abort(context: grpc.aio.ServicerContext, exc: AdapterdError) -> None:
    status = status_of(exc)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def abort_unexpected(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """INTERNAL with a generic message; the details go to the log."""
    ident = log_unexpected(exc, method, correlation_id(context))
    await context.abort(grpc.StatusCode.INTERNAL, internal_message(ident))


async def abort_for(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """The one mapping: a domain error's own status, anything else INTERNAL. Re-raises aborts."""
    if isinstance(exc, ABORTED):
        raise exc
    if is_domain_error(exc):
        await abort(context, exc)
    await abort_unexpected(context, exc, method)


def unary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every exception gets a documented status
            await abort_for(context, exc, handler.__name__)
    return wrapped


def streaming(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            async for message in handler(self, request, context):
                yield message
        except Exception as exc:  # noqa: BLE001 - every exception gets a documented status
            await abort_for(context, exc, handler.__name__)
    return wrapped
