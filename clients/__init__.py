"""adapterd clients: grpcio and the generated stubs only (no torch)."""

from .client import AdapterdClient, AsyncAdapterdClient, generate_request

__all__ = ["AdapterdClient", "AsyncAdapterdClient", "generate_request"]
