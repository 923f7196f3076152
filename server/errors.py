"""Errors the daemon's plain objects raise, each carrying the gRPC status code it maps to.

The engine, the adapter store, the merger and the training manager know nothing of gRPC; they raise these,
and the RPC layer turns them into statuses (``server/service.py``). ``field`` names the request field at
fault, so that a client learns what to fix.
"""

from __future__ import annotations

import grpc


class AdapterdError(Exception):
    """Base class: a message for the caller and the status code that fits it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(AdapterdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AdapterdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AdapterdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AdapterdError):
    """E.g. an adapter made for another base, or a prefix adapter asked to merge into weights."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AdapterdError):
    """Queue full, too many concurrent requests, or out of (GPU) memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AdapterdError):
    """Model still loading, or the daemon is draining for shutdown."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(AdapterdError):
    """A corrupt or truncated adapter file."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(AdapterdError):
    """No valid bearer token (the HTTP front end; gRPC's interceptor answers with grpc's own status)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AdapterdError):
    code = grpc.StatusCode.PERMISSION_DENIED
