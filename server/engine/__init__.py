"""The engine: the one loop that owns the model and runs the continuous, mixed-adapter batch."""

from .engine import Engine, EngineConfig
from .request import GenerationEvent, GenerationParams, StopReason

__all__ = ["Engine", "EngineConfig", "GenerationEvent", "GenerationParams", "StopReason"]
