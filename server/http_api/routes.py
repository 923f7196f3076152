"""The OpenAI-compatible endpoints, on Starlette: another front end of the runtime that gRPC serves.

- ``POST /v1/chat/completions``: ``messages`` rendered with the adapter's chat template, as gRPC's
  ``GenerateRequest.messages``; ``POST /v1/completions``: ``prompt`` sent as is, as gRPC's ``prompt``. Both
  stream with server-sent events when ``stream`` is true (``data: [DONE]`` last).
- ``GET /v1/models``: the base (its directory's name) and every adapter under the root; ``model`` names one
  of them in a request.
- ``GET /health``: 200 while the daemon serves, 503 while it loads or drains (no token needed, like gRPC's
  health service).

Each request runs the gRPC path: the same bearer tokens and roles (``auth.METHOD_ROLES`` of Generate and
ListAdapters), a slot of the same ``--max-concurrent-rpcs`` budget (so the SIGTERM drain waits for HTTP
requests too), the same validation (``service.generation_events``), the same metrics
(``adapterd_rpc_requests_total{service="openai.v1"}``), and errors with the matching status
(``responses.py``). A client that disconnects cancels its generation, as a cancelled RPC does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..auth import METHOD_ROLES, ROLES, TokenTable, bearer_token
from ..engine import GenerationEvent
from ..errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from ..limits import RpcBudget
from ..service import ServingState, generation_events
from . import responses as out
from .requests import ParsedRequest, chat_request, completion_request

SERVICE = "openai.v1"  # the service label of HTTP requests in adapterd_rpc_requests_total


class Call:
    """One HTTP request's slot in the callers' budget and its metrics record, each given back once however
    the request ends (answered, failed, or its client gone before or during a stream)."""

    def __init__(self, api: HttpApi, method: str, request: Request) -> None:
        self.api, self.method = api, method
        self.started = time.perf_counter()
        self.correlation_id = request.headers.get("x-correlation-id", "")[:128] or None
        self.adapter_id: str | None = None
        self._held = self._done = False

    def admit(self, request: Request, rpc: str) -> None:
        """Check the bearer token for the role gRPC's ``rpc`` needs, then take a budget slot."""
        self.api.authorize(request, rpc)
        if self.api.budget is not None:
            self.api.budget.acquire()
            self._held = True

    def finish(self, code: str) -> None:
        if self._done:
            return
        self._done = True
        if self._held:
            self.api.budget.release()
        if self.api.metrics is not None:
            self.api.metrics.interceptor.record_call(SERVICE, self.method, code, self.adapter_id, self.started)

    def error(self, exc: BaseException) -> JSONResponse:
        status, body = out.error_of(exc, self.method, self.correlation_id)
        self.finish(getattr(getattr(exc, "code", None), "name", "INTERNAL"))
        return JSONResponse(body, status_code=status)


class HttpApi:
    """The endpoints (module docstring) over the daemon's shared state."""

    def __init__(self, state: ServingState, base_name: str, tokens: TokenTable | None = None,
                 budget: RpcBudget | None = None, metrics: Any = None, max_body_bytes: int = 4 << 20) -> None:
        self.state, self.base_name, self.tokens = state, base_name, tokens
        self.budget, self.metrics, self.max_body_bytes = budget, metrics, max_body_bytes
        self.created = int(time.time())  # the "created" of every listed model: when this daemon started

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    def authorize(self, request: Request, rpc: str) -> None:
        if self.tokens is None:
            return
        token = bearer_token(request.headers.items())
        role = self.tokens.role_of(token) if token is not None else None
        if role is None:
            raise Unauthenticated("missing or invalid bearer token (header 'Authorization: Bearer <token>')")
        if ROLES[role] < ROLES[METHOD_ROLES[rpc]]:
            raise PermissionDenied(f"needs the {METHOD_ROLES[rpc]} role; this token is {role}")

    def adapter_of(self, model: str) -> str:
        """The adapter a request's ``model`` names: "" for the base."""
        return "" if model == self.base_name else model

    async def health(self, request: Request) -> Response:
        serving = self.state.runtime is not None and not self.state.draining
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    def _model(self, model_id: str) -> dict[str, Any]:
        parent = None if model_id == self.base_name else self.base_name
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "adapterd",
                "root": model_id, "parent": parent}

    async def _listed_ids(self, call: Call, request: Request) -> list[str]:
        call.admit(request, "ListAdapters")
        records = await self.state.ready().list_adapters()
        return [self.base_name] + [r.adapter_id for r in records]

    async def models(self, request: Request) -> Response:
        call = Call(self, "Models", request)
        try:
            ids = await self._listed_ids(call, request)
        except Exception as exc:  # noqa: BLE001 - every error gets its status (responses.error_of)
            return call.error(exc)
        call.finish("OK")
        return JSONResponse({"object": "list", "data": [self._model(i) for i in ids]})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (an adapter id may hold slashes)."""
        call = Call(self, "Models", request)
        model_id = request.path_params["model"]
        try:
            if model_id not in await self._listed_ids(call, request):
                raise NotFound(f"no model {model_id[:200]!r} (GET /v1/models lists them)", field="model")
        except Exception as exc:  # noqa: BLE001 - every error gets its status (responses.error_of)
            return call.error(exc)
        call.finish("OK")
        return JSONResponse(self._model(model_id))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        call = Call(self, "ChatCompletions" if chat else "Completions", request)
        try:
            call.admit(request, "Generate")
            parse = chat_request if chat else completion_request
            parsed = parse(await self._json(request), self.adapter_of)
            call.adapter_id = parsed.request.adapter_id
            events = generation_events(self.state, parsed.request, call.correlation_id)
            # Validation, the adapter's load and tokenizing happen before the first event: their errors get
            # their own status, before any byte of a stream is sent.
            _, prompt_tokens = await anext(events)
        except Exception as exc:  # noqa: BLE001 - every error gets its status (responses.error_of)
            return call.error(exc)
        if parsed.stream:
            # The background task gives the slot back when the client left before the stream began.
            return StreamingResponse(self._stream(call, parsed, chat, prompt_tokens, events),
                                     media_type="text/event-stream",
                                     background=BackgroundTask(call.finish, "CANCELLED"))
        return await self._whole(call, request, parsed, chat, prompt_tokens, events)

    async def _json(self, request: Request) -> Any:
        """The body as JSON, read up to ``max_body_bytes`` (``--max-message-bytes``, as gRPC's limit)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise InvalidArgument(f"larger than {self.max_body_bytes} bytes (--max-message-bytes)", field="body")
        try:
            return json.loads(body)
        except ValueError:
            raise InvalidArgument("not valid JSON", field="body") from None

    async def _whole(self, call: Call, request: Request, parsed: ParsedRequest, chat: bool, prompt_tokens: int,
                     events: AsyncIterator[tuple[GenerationEvent, int]]) -> Response:
        """The whole answer; a client that disconnects meanwhile cancels the generation (as gRPC does)."""
        collecting = asyncio.ensure_future(_collect(events))
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():
                collecting.cancel()  # the engine's row ends as the cancellation unwinds runtime.generate
                await asyncio.gather(collecting, return_exceptions=True)
                call.finish("CANCELLED")
                return Response(status_code=499)  # nobody reads it
            text, end = collecting.result()
        except Exception as exc:  # noqa: BLE001 - every error gets its status (responses.error_of)
            return call.error(exc)
        finally:
            leaving.cancel()
        call.finish("OK")
        choice = out.choice(chat, text, out.finish_reason(end.stop_reason))
        counts = out.usage(prompt_tokens, end.generated_token_count)
        return JSONResponse(out.completion(chat, out.completion_id(chat), parsed.model, [choice], counts=counts))

    async def _stream(self, call: Call, parsed: ParsedRequest, chat: bool, prompt_tokens: int,
                      events: AsyncIterator[tuple[GenerationEvent, int]]) -> AsyncIterator[bytes]:
        """Server-sent events: a first chunk (the assistant's role), one per text delta, one with the finish
        reason, the usage when asked, then ``[DONE]``. An error after the first byte is an ``error`` event."""
        ident = out.completion_id(chat)
        code = "CANCELLED"  # unless the stream reaches its end
        try:
            if chat:
                yield out.sse(out.completion(chat, ident, parsed.model, [out.choice(chat, "", None, delta=True,
                                                                                    first=True)], chunk=True))
            async for event, _ in events:
                finish = out.finish_reason(event.stop_reason) if event.kind == "end" else None
                if event.text or finish:
                    yield out.sse(out.completion(chat, ident, parsed.model,
                                                 [out.choice(chat, event.text, finish, delta=True)], chunk=True))
                if finish and parsed.include_usage:
                    yield out.sse(out.completion(chat, ident, parsed.model, [], chunk=True,
                                                 counts=out.usage(prompt_tokens, event.generated_token_count)))
            code = "OK"
        except Exception as exc:  # noqa: BLE001 - after the headers, an error is an event of the stream
            _, body = out.error_of(exc, call.method, call.correlation_id)
            code = getattr(getattr(exc, "code", None), "name", "INTERNAL")
            yield out.sse(body)
        finally:
            await events.aclose()
            call.finish(code)
        yield out.sse("[DONE]")


async def _collect(events: AsyncIterator[tuple[GenerationEvent, int]]) -> tuple[str, GenerationEvent]:
    """The text and the end event of a generation whose start event was read."""
    parts: list[str] = []
    async for event, _ in events:
        parts.append(event.text)
    return "".join(parts), event


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
