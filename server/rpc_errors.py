"""Turning the daemon's errors into gRPC statuses, with rich details (``google.rpc.BadRequest`` naming the
field) that grpcio-status clients can read. Handlers are wrapped by ``unary`` or ``streaming``."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from adapterd.server.errors import AdapterdError

log = logging.getLogger(__name__)


def status_of(exc: AdapterdError) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, exc.code.name), message=str(exc))
    if exc.field:
        detail = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)])
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, exc: AdapterdError) -> None:
    status = status_of(exc)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


def unary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except AdapterdError as exc:
            await abort(context, exc)
    return wrapped


def streaming(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            async for message in handler(self, request, context):
                yield message
        except AdapterdError as exc:
            await abort(context, exc)
    return wrapped
