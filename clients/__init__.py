"""adapterd clients: grpcio and the generated stubs only (no torch)."""

from .client import ADAPTER_ID_HEADER, AdapterdClient, AsyncAdapterdClient, generate_request

__all__ = ["ADAPTER_ID_HEADER", "AdapterdClient", "AsyncAdapterdClient", "generate_request"]
