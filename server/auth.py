"""Bearer-token authentication with two roles, as a grpc.aio server interceptor.

Tokens come from a file (``--tokens-file``) so that they never appear in a process listing or a shell
history. Two roles: ``user`` may generate and read (generate, stream, tokenize, list adapters, model info,
training status); ``admin`` may also change what the daemon holds or runs (load, unload, merge, start and
stop training). The health service and reflection need no token, so that orchestrators and ``grpcurl list``
work without one.

Every Adapterd method is mapped explicitly; a method missing from the map (a new RPC nobody classified)
needs ``admin``, so that forgetting to classify one fails closed. A missing or unknown token is
UNAUTHENTICATED; a valid token of too low a role is PERMISSION_DENIED.

The presented token is compared with every configured token with ``hmac.compare_digest`` over SHA-256
digests (equal lengths, no early exit), so the time taken says nothing about how close a guess was or which
token matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

USER, ADMIN = "user", "admin"
ROLES: dict[str, int] = {USER: 1, ADMIN: 2}  # a role may do everything a lower one may

SERVICE = "adapterd.v1.Adapterd"
# Adapterd method -> the lowest role that may call it.
METHOD_ROLES: dict[str, str] = {
    "Generate": USER, "GenerateStream": USER, "Tokenize": USER, "ListAdapters": USER, "ModelInfo": USER,
    "TrainStatus": USER, "WatchTraining": USER,
    "LoadAdapter": ADMIN, "UnloadAdapter": ADMIN, "MergeAdapter": ADMIN, "StartTraining": ADMIN,
    "StopTraining": ADMIN,
}
# Services that need no token: health probes and server reflection (descriptors only, no data).
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})


def required_role(method: str) -> str | None:
    """The role ``/package.Service/Method`` needs; None for the open services. Unknown methods: admin."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service in OPEN_SERVICES:
        return None
    if service == SERVICE:
        return METHOD_ROLES.get(name, ADMIN)
    return ADMIN


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenTable:
    """Configured tokens, kept only as SHA-256 digests with their role."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> TokenTable:
        """``(role, token)`` pairs; raises ValueError for an unknown role, an empty or reused token."""
        seen: set[bytes] = set()
        entries: list[tuple[bytes, str]] = []
        for role, token in pairs:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
            if not token or token != token.strip() or any(c.isspace() for c in token):
                raise ValueError(f"a {role} token is empty or contains whitespace")
            digest = _digest(token)
            if digest in seen:
                raise ValueError(f"a {role} token appears twice")
            seen.add(digest)
            entries.append((digest, role))
        if not entries:
            raise ValueError("no tokens configured")
        return cls(tuple(entries))

    def role_of(self, token: str) -> str | None:
        """The role of ``token``, or None. Compares against every entry, whatever matched."""
        presented = _digest(token)
        found: str | None = None
        for digest, role in self.entries:
            if hmac.compare_digest(presented, digest):
                found = role
        return found


def load_tokens(path: str | Path) -> TokenTable:
    """Read a tokens file: JSON (``{"admin": ["..."], "user": ["..."]}`` or ``[{"role": .., "token": ..}]``)
    or lines ``role:token`` (``#`` comments and blank lines skipped). Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"tokens file {path}: cannot read it: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("tokens file %s is readable by group or others; chmod 600 it", path)
    try:
        return TokenTable.from_pairs(_parse(text))
    except ValueError as exc:
        raise ValueError(f"tokens file {path}: {exc}") from exc


def _parse(text: str) -> list[tuple[str, str]]:
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            pairs = []
            for role, tokens in data.items():
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ValueError(f"{role!r} must map to a list of token strings")
                pairs.extend((role, t) for t in tokens)
            return pairs
        if all(isinstance(e, dict) and isinstance(e.get("role"), str) and isinstance(e.get("token"), str)
               for e in data):
            return [(e["role"], e["token"]) for e in data]
        raise ValueError('a JSON list must hold {"role": ..., "token": ...} objects')
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, token = line.partition(":")
        if not sep:
            raise ValueError(f"line {number}: expected role:token")
        pairs.append((role.strip(), token.strip()))
    return pairs


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header (scheme case-insensitive), or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a sufficient token before the handler runs.

    A refused call gets a handler with the same kind of response (unary or streaming) that aborts with
    UNAUTHENTICATED or PERMISSION_DENIED at once, so that an outer interceptor (metrics) sees the status
    code; it does not wait for the request message.
    """

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        needed = required_role(details.method)
        if needed is None:
            return await continuation(details)
        token = bearer_token(details.invocation_metadata)
        role = self.tokens.role_of(token) if token is not None else None
        if role is None:
            refusal = (grpc.StatusCode.UNAUTHENTICATED,
                       "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
        elif ROLES[role] < ROLES[needed]:
            refusal = (grpc.StatusCode.PERMISSION_DENIED,
                       f"{details.method.rpartition('/')[2]} needs the {needed} role; this token is {role}")
        else:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: only an authorised caller learns that it is UNIMPLEMENTED
            handler = grpc.unary_unary_rpc_method_handler(None)
        return _refusing(handler, *refusal)


def handler_behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The one function a method handler runs (exactly one of its four kinds is set)."""
    return handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary


def handler_like(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any],
                 request_deserializer: Callable[[bytes], Any] | None = None, *,
                 stream_request: bool = False) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (unary or streaming request and response) running
    ``behavior``, with ``handler``'s (de)serializers unless another request deserializer is given.

    ``stream_request`` makes it request-streaming whatever ``handler`` is: grpc then calls ``behavior`` as
    soon as the call's headers arrive, without waiting for a request message (which a client may never
    send), and ``behavior`` reads the message itself if it wants it."""
    kw = {"request_deserializer": request_deserializer or handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if (handler.request_streaming or stream_request) and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    if handler.request_streaming or stream_request:
        return grpc.stream_unary_rpc_method_handler(behavior, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler shaped like ``handler`` whose every call aborts with ``code``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this line makes the function an async generator

    # Request-streaming: the refusal goes out with the headers, before (or without) any request message, so
    # a caller without a token holds nothing while it waits to send one.
    return handler_like(handler, refuse_stream if handler.response_streaming else refuse, stream_request=True)
