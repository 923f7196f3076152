"""Generated gRPC stubs for ``adapterd.v1`` (``python -m adapterd.protogen`` regenerates them)."""
