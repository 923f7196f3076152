"""The in-process serving runtime: the base model, the adapter store and the engine, wired together.

It runs inside the engine-core process (``server/core/``), where ``EngineCore`` drives it, and in the gRPC
process itself when the daemon runs without one (``--no-engine-process``), as tests and the engine-alone
benchmarks do. Its async methods are the facade the RPC handlers call (``EngineClient`` offers the same
ones across the process boundary): ``generate`` is an async iterator over one request's events that never
blocks the event loop (adapter loads run in a worker thread, the model in the engine thread, tenants' text is
tokenized in ``server/prompts.py``'s pools). What the facade takes and gives is plain data (token ids,
``GenerationParams``, ``AdapterRef``, ``ModelInfo``, ``AdapterRecord``), never the engine's live objects.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from .adapters.lora import linear_shapes
from .adapters.store import AdapterRecord, AdapterStore, BaseShape
from .core.protocol import AdapterRef, ModelInfo
from .engine import Engine, EngineConfig, GenerationEvent, GenerationParams
from .engine.output import RequestOutput, text_events
from .model import BaseModel, load_base_model
from .prompts import PreparedPrompt, Prompts, PromptsFacade

__all__ = ["EventHandoff", "PreparedPrompt", "Runtime", "request_name"]


def request_name(client_id: str | None) -> str:
    """The engine's id of a request: a client's correlation id names it in logs; the suffix keeps two requests
    that share one apart."""
    return f"{client_id}/{uuid.uuid4().hex[:12]}" if client_id else uuid.uuid4().hex


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


class Runtime(PromptsFacade):
    def __init__(self, base: BaseModel, adapter_root: Path, engine_config: EngineConfig,
                 max_loaded_adapter_bytes: int | None = None) -> None:
        self.base = base
        self.engine_config = engine_config
        shape = BaseShape(linear_shapes=linear_shapes(base.model), num_layers=base.num_layers,
                          num_kv_heads=base.num_kv_heads, head_dim=base.head_dim, dtype=base.dtype,
                          device=base.device, max_lora_rank=engine_config.max_lora_rank)
        self.store = AdapterStore(Path(adapter_root), shape, max_loaded_adapter_bytes)
        self.engine = Engine(base, engine_config)
        self.prompts = Prompts(base.tokenizer, base.max_sequence_length,
                               base.model.get_input_embeddings().num_embeddings)
        self.store.is_on_device = lambda adapter: self.engine.runner.slots.resident(adapter.key)
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
        self.prompts.close()
        self.engine.stop()

    def model_info(self) -> ModelInfo:
        base, cfg = self.base, self.engine_config
        return ModelInfo(base_model=str(base.path), model_type=str(base.config.model_type),
                         quantization=base.quantization, dtype=str(base.dtype).removeprefix("torch."),
                         device=str(base.device), max_sequence_length=base.max_sequence_length,
                         max_batch_size=cfg.max_batch_size, max_lora_rank=cfg.max_lora_rank,
                         adapter_slots=cfg.lora_slots,
                         vocab_size=base.model.get_input_embeddings().num_embeddings)

    def stats(self) -> dict[str, int]:
        """Requests running and waiting in the engine."""
        return self.engine.stats()

    # ------------------------------------------------------------------ requests

    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.prompts.tokenize(text, special_tokens)

    def prepare_prompt(self, prompt: str, truncate_to: int, max_input_tokens: int, virtual_tokens: int = 0,
                       special_tokens: bool = True, field: str = "prompt") -> PreparedPrompt:
        return self.prompts.prepare_prompt(prompt, truncate_to, max_input_tokens, virtual_tokens, special_tokens,
                                           field)

    async def adapter(self, adapter_id: str, field: str = "adapter_id") -> AdapterRef | None:
        """The adapter, loaded first if it was not (NOT_FOUND, FAILED_PRECONDITION... as the store says)."""
        if not adapter_id:
            return None
        return await asyncio.to_thread(self.adapter_ref, adapter_id, field)

    def adapter_ref(self, adapter_id: str, field: str = "adapter_id") -> AdapterRef:
        """``adapter``, blocking (a worker thread's)."""
        loaded = self.store.get(adapter_id, field)
        return AdapterRef(loaded.adapter_id, loaded.type, loaded.num_virtual_tokens, loaded.chat_template)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None,
                       request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Submit one request and yield its events until "end". Leaving early cancels it."""
        loaded = None
        if adapter is not None:  # loaded by ``adapter`` just before, unless evicted since
            loaded = (self.store.loaded_now(adapter.adapter_id)
                      or await asyncio.to_thread(self.store.get, adapter.adapter_id))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request_id = request_name(request_id)
        handoff = self._handoffs.get(loop)
        if handoff is None:
            handoff = self._handoffs.setdefault(loop, EventHandoff(loop))
        self.engine.submit(request_id, prompt_ids, params, loaded, lambda event: handoff.post(events, event))
        output = RequestOutput(self.base.tokenizer, params)
        async for event in text_events(events, output, lambda: self.engine.cancel(request_id)):
            yield event

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self._load_and_describe, adapter_id)

    def _load_and_describe(self, adapter_id: str) -> AdapterRecord:
        self.store.load(adapter_id)
        return self.store.record(adapter_id)  # reads the directory: in the worker thread too

    async def unload_adapter(self, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self.store.unload, adapter_id)

    async def list_adapters(self) -> list[AdapterRecord]:
        """Every adapter under the root, each entry on its own (an odd one is listed as LOAD_FAILED); the walk
        and the configs it reads run in a worker thread."""
        return await asyncio.to_thread(self.store.list)
