"""Concurrent-RPC budgets, counted after authentication, and one error mapping for every service.

grpc's own ``maximum_concurrent_rpcs`` counts a call the moment it arrives, before any interceptor runs: 50
tokenless ``Health.Watch`` streams filled a budget of 50 and every authenticated call was refused. So the
daemon counts for itself, in the innermost interceptor (after ``AuthInterceptor``, whose refusals end at
once and hold nothing):

- ``adapterd.v1.Adapterd`` calls count against ``--max-concurrent-rpcs`` (the callers' budget); with
  ``--tokens-file`` only authenticated calls get this far;
- health and reflection calls, which need no token, count against their own small budget
  (``--max-open-rpcs``), so that they can never use up the callers' one. They are counted from their
  headers, before their request message arrives (they are registered as request-streaming and read the
  message themselves), so that calls which never send one fill this budget, not grpc's hard cap.

A call over its budget ends with RESOURCE_EXHAUSTED; its slot comes back when the call ends, however it
ends (finished, aborted, cancelled). grpc keeps a hard cap well above both budgets (``hard_rpc_cap``), so
the process stays bounded even counting calls that are being refused.

The wrapper also gives every service the daemon's error mapping (``rpc_errors.abort_for``): an exception
escaping health or reflection becomes INTERNAL with an error id rather than grpc's ``UNKNOWN`` carrying the
exception's text; and a request that is not a valid protobuf message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .auth import handler_behavior, handler_like, required_role
from .errors import InvalidArgument, ResourceExhausted
from .rpc_errors import abort_for

# Calls being refused (bad token, over budget) still hold one of grpc's slots for a moment: leave room.
HARD_CAP_HEADROOM = 64


def hard_rpc_cap(callers: int | None, open_calls: int) -> int | None:
    """grpc's own cap: twice both budgets plus headroom, or none when the callers' budget is unlimited."""
    if callers is None:
        return None
    return 2 * (callers + open_calls) + HARD_CAP_HEADROOM


@dataclass
class RpcBudget:
    """Calls in progress against a limit (None: unlimited, still counted). Used from the event loop only.

    ``shared``: with several front ends (``--frontends``), a semaphore of ``limit`` that all of them take
    from, so that the limit holds for the daemon, not for each front end; ``in_use`` stays this process's."""

    name: str
    limit: int | None
    flag: str
    in_use: int = 0
    shared: Any = None  # multiprocessing.BoundedSemaphore(limit), or None

    def acquire(self) -> None:
        full = (not self.shared.acquire(block=False) if self.shared is not None
                else self.limit is not None and self.in_use >= self.limit)
        if full:
            raise ResourceExhausted(f"concurrent RPC limit reached: {self.limit} {self.name} calls in progress "
                                    f"({self.flag}); retry later")
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        if self.shared is not None:
            self.shared.release()


class _Malformed:
    """What the wrapped deserializer returns for bytes that are not the request message."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _checked_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, ValueError, TypeError):
            return _Malformed(getattr(getattr(deserializer, "__self__", None), "__name__", "request"))
    return deserialize


class BudgetInterceptor(grpc.aio.ServerInterceptor):
    """Counts each call against its budget (module docstring) and maps what escapes its handler."""

    def __init__(self, callers: RpcBudget, open_calls: RpcBudget) -> None:
        self.callers = callers
        self.open_calls = open_calls

    def budget_for(self, method: str) -> RpcBudget:
        return self.open_calls if required_role(method) is None else self.callers

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        behavior = handler_behavior(handler)
        # Synchronous handlers run in grpc's thread pool; this daemon registers none.
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler
        budget, method = self.budget_for(details.method), details.method.rpartition("/")[2]
        if handler.request_streaming:
            return handler_like(handler, self._wrap(behavior, budget, method, read_first=False))
        # A call that needs no token is counted before its request message arrives, so that calls which
        # never send one (held open by an anonymous client) fill only the open budget, not grpc's hard cap.
        read_first = budget is self.open_calls
        return handler_like(handler, self._wrap(behavior, budget, method, read_first=read_first),
                            _checked_deserializer(handler.request_deserializer), stream_request=read_first)

    @contextlib.asynccontextmanager
    async def _guard(self, budget: RpcBudget, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        try:
            budget.acquire()
        except ResourceExhausted as exc:
            await abort_for(context, exc, method)
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one mapping for every service
            await abort_for(context, exc, method)
        finally:
            budget.release()

    def _wrap(self, behavior: Callable[..., Any], budget: RpcBudget, method: str,
              read_first: bool) -> Callable[..., Any]:
        """``behavior`` counted against ``budget``; with ``read_first`` it is called with the one message
        read from a request stream (the handler was registered as request-streaming: see above)."""

        async def request_of(received: Any) -> Any:
            if read_first:
                async for message in received:
                    received = message
                    break
                else:
                    raise InvalidArgument("no request message arrived", field="request")
            if isinstance(received, _Malformed):
                raise InvalidArgument(f"not a valid {received.type_name} message", field="request")
            return received

        if inspect.isasyncgenfunction(behavior):
            async def stream(received: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._guard(budget, context, method):
                    async for message in behavior(await request_of(received), context):
                        yield message
            return stream

        async def unary(received: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(budget, context, method):
                return await behavior(await request_of(received), context)
        return unary
