"""The serving runtime: the base model, the adapter store and the engine, wired together.

RPC handlers talk to this object only. ``generate`` is an async iterator over one request's events; it
never blocks the event loop (adapter loads run in a worker thread, the model in the engine thread, and
tenants' text is tokenized in ``server/tokenizing.py``'s pools: ``tokenize_text``, ``prompt_ids``).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from adapterd.server.adapters.lora import linear_shapes
from adapterd.server.adapters.store import AdapterRecord, AdapterStore, BaseShape, LoadedAdapter
from adapterd.server.chat import render as render_chat
from adapterd.server.chat import template_for
from adapterd.server.engine import Engine, EngineConfig, GenerationEvent, GenerationParams
from adapterd.server.errors import InvalidArgument
from adapterd.server.model import BaseModel, load_base_model
from adapterd.server.tokenizing import Tokenization


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    truncated: bool


class EventHandoff:
    """Hands engine events to one event loop's request queues, waking the loop once per batch of events.

    The engine emits one event per running row per step; waking the loop for each (``call_soon_threadsafe``
    writes to the loop's self-pipe and takes the GIL) costs the loop as much as the handlers' own work at
    high token rates. Events wait in a list instead, and the first one of a batch schedules one drain.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, GenerationEvent]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, event: GenerationEvent) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a drain is already scheduled and has not run yet
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class Runtime:
    def __init__(self, base: BaseModel, adapter_root: Path, engine_config: EngineConfig,
                 max_loaded_adapter_bytes: int | None = None) -> None:
        self.base = base
        self.engine_config = engine_config
        shape = BaseShape(linear_shapes=linear_shapes(base.model), num_layers=base.num_layers,
                          num_kv_heads=base.num_kv_heads, head_dim=base.head_dim, dtype=base.dtype,
                          device=base.device, max_lora_rank=engine_config.max_lora_rank)
        self.store = AdapterStore(Path(adapter_root), shape, max_loaded_adapter_bytes)
        self.engine = Engine(base, engine_config)
        self.tokenization = Tokenization(base.tokenizer)
        self.store.is_on_device = lambda adapter: self.engine.slots.resident(adapter.key)
        self.store.on_unload = self.engine.evict
        self._handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventHandoff] = (
            weakref.WeakKeyDictionary())

    @classmethod
    def load(cls, base_dir: str | Path, adapter_root: str | Path, quantization: str = "int8",
             engine_config: EngineConfig | None = None, device: str | None = None,
             dtype: str | None = None, max_sequence_length: int | None = None,
             max_loaded_adapter_bytes: int | None = None) -> Runtime:
        base = load_base_model(base_dir, quantization, device=device, dtype=dtype,
                               max_sequence_length=max_sequence_length)
        runtime = cls(base, Path(adapter_root), engine_config or EngineConfig(), max_loaded_adapter_bytes)
        runtime.engine.start()
        return runtime

    def close(self) -> None:
        self.tokenization.close()
        self.engine.stop()

    # ------------------------------------------------------------------ requests

    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        """``special_tokens=False`` for a rendered chat prompt, whose template wrote them (BOS...) itself."""
        return self.base.tokenizer(text, add_special_tokens=special_tokens).input_ids

    def _tokens_and_pieces(self, text: str, with_pieces: bool, special_tokens: bool) -> tuple[list[int], list[str]]:
        ids = self.tokenize(text, special_tokens)
        return ids, (self.base.tokenizer.convert_ids_to_tokens(ids) if with_pieces else [])

    async def tokenize_text(self, text: str, with_pieces: bool = False,
                            special_tokens: bool = True) -> tuple[list[int], list[str]]:
        """Token ids (and their pieces) of ``text``, tokenized off the event loop."""
        return await self.tokenization.run(text, self._tokens_and_pieces, text, with_pieces, special_tokens)

    async def render_messages(self, messages: list[dict[str, str]], adapter: LoadedAdapter | None) -> str:
        """Chat messages (checked by ``validation.validate_messages``) as the prompt text: the adapter's chat
        template, else the base tokenizer's, else the Alpaca default (``server/chat.py``). Rendered in the
        tokenizing lanes, off the event loop; tokenize the result with ``special_tokens=False``."""
        template = template_for(adapter.chat_template if adapter else None, self.base.tokenizer)
        owner = f"adapter {adapter.adapter_id!r}" if adapter else "the base model"
        contents = "".join(m["content"] for m in messages)  # its length picks the lane
        return await self.tokenization.run(contents, render_chat, self.base.tokenizer, messages, template, owner)

    def _input_limit(self, max_input_tokens: int, virtual_tokens: int) -> int:
        return min(max_input_tokens, self.base.max_sequence_length - 1 - virtual_tokens)

    async def prompt_ids(self, prompt: str, truncate_to: int, max_input_tokens: int,
                         virtual_tokens: int = 0, *, special_tokens: bool = True,
                         field: str = "prompt") -> PreparedPrompt:
        """``prepare_prompt`` off the event loop; a prompt that certainly has too many tokens is refused
        before it is tokenized (``Tokenization.fits``), unless the request asks for truncation. A rendered
        chat prompt: ``special_tokens=False``, ``field="messages"`` (what errors name)."""
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if not truncate_to and not self.tokenization.fits(prompt, limit):
            raise InvalidArgument(f"prompt has {len(prompt)} characters, more than {limit} tokens can hold (set "
                                  "truncate_input_tokens to keep only the last tokens)", field=field)
        return await self.tokenization.run(prompt, self.prepare_prompt, prompt, truncate_to, max_input_tokens,
                                           virtual_tokens, special_tokens, field)

    def prepare_prompt(self, prompt: str, truncate_to: int, max_input_tokens: int,
                       virtual_tokens: int = 0, special_tokens: bool = True, field: str = "prompt") -> PreparedPrompt:
        """Token ids of ``prompt``. Too long -> InvalidArgument, or keep the last ``truncate_to`` tokens when
        the request asks for truncation. A prefix adapter's ``virtual_tokens`` take positions too."""
        ids = self.tokenize(prompt, special_tokens)
        if not ids:
            raise InvalidArgument("must not be empty", field=field)
        truncated = False
        if truncate_to and len(ids) > truncate_to:
            ids, truncated = ids[-truncate_to:], True
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if len(ids) > limit:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; at most {limit} are taken (set "
                                  "truncate_input_tokens to keep only the last ones)", field=field)
        return PreparedPrompt(ids=ids, truncated=truncated)

    async def adapter(self, adapter_id: str, field: str = "adapter_id") -> LoadedAdapter | None:
        if not adapter_id:
            return None
        return await asyncio.to_thread(self.store.get, adapter_id, field)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: LoadedAdapter | None,
                       request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Submit one request and yield its events until "end". Leaving early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        # A client's correlation id names the request in logs; the suffix keeps two requests that share one apart.
        request_id = f"{request_id}/{uuid.uuid4().hex[:12]}" if request_id else uuid.uuid4().hex
        handoff = self._handoffs.get(loop)
        if handoff is None:
            handoff = self._handoffs.setdefault(loop, EventHandoff(loop))
        self.engine.submit(request_id, prompt_ids, params, adapter, lambda event: handoff.post(events, event))
        finished = False
        held: GenerationEvent | None = None
        try:
            while not finished:
                event = held or await events.get()
                held = None
                # A reader that fell behind gets the deltas waiting for it as one message, not one each.
                while event.kind == "delta" and not events.empty():
                    following = events.get_nowait()
                    if following.kind != "delta":
                        held = following
                        break
                    event = event.followed_by(following)
                finished = event.kind == "end"
                yield event
        finally:
            if not finished:
                self.engine.cancel(request_id)

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self._load_and_describe, adapter_id)

    def _load_and_describe(self, adapter_id: str) -> AdapterRecord:
        self.store.load(adapter_id)
        return self.store.record(adapter_id)  # reads the directory: in the worker thread too

    async def unload_adapter(self, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self.store.unload, adapter_id)

    def list_adapters(self) -> list[AdapterRecord]:
        """Every adapter under the root, each entry on its own (an odd one is listed as LOAD_FAILED).
        Blocking: it walks the root and reads changed configs, so call it from a worker thread."""
        return self.store.list()
