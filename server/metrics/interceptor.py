"""A grpc.aio server interceptor that counts every RPC by service, method, status code and adapter, and
times it (seconds, from arrival to the last response message or the error).

The status code is what the client receives: OK when the handler returns; the aborted code when it calls
``context.abort`` (the service's ``rpc_errors`` wrappers do); CANCELLED when the client goes away; UNKNOWN for
an exception that escapes the handler. The adapter label comes from the request's ``adapter_id`` field, when
the request message has one, through ``AdapterLabels`` (never promoting: an unknown id is "other").
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..auth import handler_behavior, handler_like
from .definitions import Metrics
from .labels import AdapterLabels

_NO_ADAPTER = ""


def _code_name(context: Any, fallback: grpc.StatusCode) -> str:
    """The status code set on ``context`` (by abort or set_code), else ``fallback``, as its name."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context that cannot tell
        code = None
    if code is None:
        return fallback.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    for member in grpc.StatusCode:  # some grpc versions report the integer value
        if member.value[0] == code:
            return member.name
    return fallback.name



class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each async handler whose response is one message or an async generator; request-streaming
    ones (refusals, health checks: ``server/auth.py``, ``server/limits.py``) are counted with no adapter
    label. Coroutine streaming handlers (health's Watch) and synchronous handlers pass through uncounted."""

    def __init__(self, metrics: Metrics, labels: AdapterLabels) -> None:
        self.m = metrics
        self.labels = labels
        self._durations: dict[tuple[str, str], Any] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        # Request-streaming handlers too: calls the daemon refuses or reads itself before the message
        # (auth.py, limits.py).
        behavior = handler_behavior(handler)
        if inspect.isasyncgenfunction(behavior):
            return handler_like(handler, self._stream(behavior, service, method))
        if inspect.iscoroutinefunction(behavior):
            return handler_like(handler, self._unary(behavior, service, method))
        return handler

    def _record(self, service: str, method: str, code: str, request: Any, started: float) -> None:
        self.record_call(service, method, code, getattr(request, "adapter_id", None), started)

    def record_call(self, service: str, method: str, code: str, adapter_id: str | None, started: float) -> None:
        """Count one call that ended with ``code`` (a grpc.StatusCode name) and time it from ``started``
        (``time.perf_counter()``); the HTTP front end counts its requests here too."""
        adapter = _NO_ADAPTER if adapter_id is None else self.labels.label(adapter_id)
        self.m.rpcs.inc((service, method, code, adapter))
        key = (service, method)
        timer = self._durations.get(key)
        if timer is None:
            timer = self._durations[key] = self.m.rpc_duration.labels(service, method)
        timer.observe(time.perf_counter() - started)

    def _unary(self, behavior: Callable[..., Awaitable[Any]], service: str, method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                response = await behavior(request, context)
                code = _code_name(context, grpc.StatusCode.OK)
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:  # an abort (grpc.aio.AbortError) included: the context holds its code
                code = _code_name(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._record(service, method, code, request, started)
        return wrapped

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]], service: str,
                method: str) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "OK"
            try:
                async for message in behavior(request, context):
                    yield message
                code = _code_name(context, grpc.StatusCode.OK)
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception:  # an abort (grpc.aio.AbortError) included: the context holds its code
                code = _code_name(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._record(service, method, code, request, started)
        return wrapped
