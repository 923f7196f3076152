"""The engine: the one loop that owns the model and runs the continuous, mixed-adapter batch."""

from adapterd.server.engine.engine import Engine, EngineConfig
from adapterd.server.engine.request import GenerationEvent, GenerationParams, StopReason

__all__ = ["Engine", "EngineConfig", "GenerationEvent", "GenerationParams", "StopReason"]
