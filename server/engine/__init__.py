"""The engine: the one loop that owns the model and runs the continuous, mixed-adapter batch.

``Engine`` and ``EngineConfig`` load on first access: the LoRA layer (``adapters/lora.py``) reads its rows
from ``step_context``, and importing that module must not import the engine, which imports the LoRA layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .request import GenerationEvent, GenerationParams, StopReason

if TYPE_CHECKING:
    from .engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig", "GenerationEvent", "GenerationParams", "StopReason"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "EngineConfig"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
