"""Generated gRPC stubs for ``adapterd.v1`` (``python -m adapterd.common.protogen`` regenerates them)."""
