"""What one forward of a step tells the layers it runs through (after vLLM's forward context).

A step (``prefill_step.py``, ``decode_step.py``) builds one ``StepContext`` per forward: its phase, its rows'
LoRA slots (``LoraRows``, built by the slot table for that phase: the decode kernel or a torch path) and the
key/value pool's view that the model gets as its cache. ``run_forward`` enters it for the forward's duration
only; the LoRA layers read it through ``current_step``, which raises outside any step, so a forward can
never read the rows of an earlier step. Nothing per step is left in a shared field.

CUDA graphs: a step builds its context inside the function a graph captures, from the step's static device
buffers (slot ids, write positions), so the graph records reads of those tensors and every replay reads
what the step copied into them; no context is consulted on the host during a replay.

The context lives in a ``ContextVar``: each thread (the engine thread, a test's) sees only its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..adapters.lora import LoraRows
    from ..model import BaseModel

Phase = Literal["prefill", "decode"]

_CURRENT: ContextVar[StepContext | None] = ContextVar("adapterd_step_context", default=None)


@dataclass(frozen=True)
class StepContext:
    """One forward's state: ``lora`` is None when no row of it uses a LoRA adapter (the layers pass the base
    output through); ``cache`` is what the model gets as its key/value cache (a pool view, or the general
    prefill's transient cache; None for a forward without one)."""

    phase: Phase
    lora: LoraRows | None = None
    cache: Any = None


@contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """``context`` is the current step's until the block ends (nested: the outer one comes back)."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def current_step() -> StepContext:
    """The step context of the forward now running; RuntimeError outside any."""
    context = _CURRENT.get()
    if context is None:
        raise RuntimeError("a LoRA layer ran outside any engine step: run the forward inside step_context() "
                           "(the engine's steps do; a forward of the base alone: StepContext('prefill'))")
    return context


def run_forward(base: BaseModel, context: StepContext, **inputs: Any) -> Any:
    """``base.model(**inputs)`` inside ``context``, with its cache as the model's key/value cache."""
    with step_context(context):
        return base.model(**inputs, use_cache=True, **{base.cache_kwarg: context.cache})
