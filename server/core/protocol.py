"""What crosses between a front end and the engine core: plain data, encoded with msgpack (msgspec).

Requests carry token ids, validated parameters and an adapter id, never tensors or live objects; the decoder
accepts exactly these message types (a typed schema, not pickle), so a malformed frame is an error, not code.
Front end -> core: ``Submit``, ``Cancel``, ``Call``. Core -> front end: ``Outputs`` (every event of one engine
step for that front end, one frame; a step that prefills sends its new rows' first tokens in a frame of their
own first), ``Reply`` (to a ``Call``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import errors
from ..engine.request import GenerationEvent, GenerationParams, StopReason


class ModelInfo(msgspec.Struct, frozen=True):
    """What the engine serves: the base model and the engine's limits (the ModelInfo RPC, metrics labels)."""

    base_model: str
    model_type: str
    quantization: str
    dtype: str
    device: str
    max_sequence_length: int
    max_batch_size: int
    max_lora_rank: int
    adapter_slots: int
    vocab_size: int  # rows of the token embedding: prompt token ids must be below it


class AdapterRef(msgspec.Struct, frozen=True):
    """A loaded adapter as a front end needs it: its id, how many positions its virtual tokens take, and the
    chat template it carries (``server/chat.py``; None: the base's)."""

    adapter_id: str
    type: str
    num_virtual_tokens: int = 0
    chat_template: str | None = None


class ErrorInfo(msgspec.Struct, frozen=True):
    """A domain error (``server/errors.py``) by class name, or "" for an unexpected one (details in the
    core's log only)."""

    kind: str
    message: str
    field: str | None = None


class Submit(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
    adapter_id: str = ""
    # "unix:" and the path of a Unix socket the sending front end listens on: the core connects to it once,
    # and the engine thread writes this front end's Outputs there itself (frames.py), not through the I/O
    # thread's ROUTER and zmq's I/O thread on either side; the front end then sends its Submits, Cancels and
    # calls over the same connection. Empty: the ROUTER.
    outputs: str = ""


class Cancel(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Call(msgspec.Struct, tag=True, frozen=True):
    call_id: int
    method: str  # one of EngineCore.CALLS
    args: list[str] = []


class Event(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    kind: str  # "start", "delta", "end"
    token_ids: list[int] = []
    input_token_count: int = 0
    seed: int = 0
    stop_reason: int = 0
    error: ErrorInfo | None = None


class Outputs(msgspec.Struct, tag=True, frozen=True):
    events: list[Event]
    # Requests whose events were in a frame this front end's full queue dropped (it fell ``OUTPUT_HWM`` frames
    # behind): the core cancelled them, and the front end ends their streams with an error instead of
    # waiting for tokens, or an end, that will never come.
    lost: list[str] = []


class Reply(msgspec.Struct, tag=True, frozen=True):
    call_id: int
    value: Any = None
    error: ErrorInfo | None = None


ToCore = Submit | Cancel | Call
FromCore = Outputs | Reply

encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)

_DOMAIN = {cls.__name__: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, errors.AdapterdError)}


def error_info(exc: BaseException) -> ErrorInfo:
    """A domain error by the name of its nearest class in ``server/errors.py`` (a subclass defined elsewhere
    keeps its status code); anything else by its type alone."""
    if isinstance(exc, errors.AdapterdError):
        kind = next(cls.__name__ for cls in type(exc).__mro__ if _DOMAIN.get(cls.__name__) is cls)
        return ErrorInfo(kind, exc.message, exc.field)
    return ErrorInfo("", f"{type(exc).__name__}")


def rebuild_error(info: ErrorInfo) -> Exception:
    """The front end's exception for ``info``: the same domain error, or a plain RuntimeError for an unexpected
    one (the RPC layer answers it as an internal error with a generic message)."""
    cls = _DOMAIN.get(info.kind)
    if cls is None:
        return RuntimeError(f"the engine failed: {info.message}")
    return cls(info.message, field=info.field)


def event_message(request_id: str, event: GenerationEvent) -> Event:
    return Event(request_id, event.kind, event.token_ids, event.input_token_count, event.seed,
                 int(event.stop_reason), error_info(event.error) if event.error is not None else None)


def engine_event(message: Event) -> GenerationEvent:
    return GenerationEvent(message.kind, input_token_count=message.input_token_count,
                           generated_token_count=len(message.token_ids) if message.kind == "end" else 0,
                           stop_reason=StopReason(message.stop_reason), seed=message.seed,
                           error=rebuild_error(message.error) if message.error is not None else None,
                           token_ids=message.token_ids)
