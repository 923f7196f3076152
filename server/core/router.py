"""Several engine cores behind one front end (``--device cuda:0,cuda:1``): ``CoreRouter``, the runtime facade
over one ``EngineClient`` per core, with the same methods, so the RPC handlers do not know how many there are.

Each core loads the whole base on its own device (the 8-bit base of a 7B model fits one GPU) and keeps its own
adapter slots, so where a request runs decides which device's slots it warms:

- An adapter's requests go to its *preferred* core: the live core with the highest rendezvous
  (highest-random-weight) score of ``(core index, adapter id)``. Every front end computes the same scores (a
  keyed blake2b, not Python's per-process ``hash``), and a dead core's adapters move to their next core by
  score while the others' stay where they are; when it serves again they move back.
- Spill-over: when the preferred core has more than ``spill_threshold`` requests in flight beyond the least
  loaded live core, the request goes to that core instead (counted in ``spills``; the metric
  ``adapterd_router_spills_total``). One hot adapter can then use every device, at the price of a cold load
  on the other one. In-flight counts are this front end's own (each front end of ``--frontends`` routes its
  own connections), which the kernel spreads evenly among them.
- Base-model requests (no adapter) go to the least loaded live core.
- ``LoadAdapter`` loads on the adapter's preferred core; ``UnloadAdapter`` unloads on every live core (a
  spilled request may have loaded it elsewhere). ``ListAdapters``: the root is shared, so one listing, each
  adapter with its most resident state over the cores. ``ModelInfo``: the first core's, with every device.
  ``stats``: summed over the live cores (``core_stats``: each core's).
- A core that dies ends only its own requests (its client answers UNAVAILABLE); the router skips it until
  ``core_up``. No live core: UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from ..adapters.store import LOAD_FAILED, LOADING, ON_DISK, RESIDENT_CPU, RESIDENT_GPU, AdapterRecord
from ..engine.request import GenerationEvent, GenerationParams
from ..errors import Unavailable
from ..prompts import PromptsFacade
from .client import DOWN_MESSAGE, EngineClient
from .protocol import AdapterRef, ModelInfo

SPILL_THRESHOLD = 8  # requests in flight the preferred core may be ahead of the least loaded one before a spill
# ListAdapters' merge: the state that says the most about residency wins (a core holding it on the GPU beats
# one where it is on disk); a failure is kept only when no core holds it.
_RESIDENCY = {RESIDENT_GPU: 5, RESIDENT_CPU: 4, LOADING: 3, LOAD_FAILED: 2, ON_DISK: 1}


def rendezvous_score(adapter_id: str, core: int) -> int:
    """The weight of ``core`` for ``adapter_id``: the same in every process and every run."""
    digest = hashlib.blake2b(adapter_id.encode("utf-8"), digest_size=8, key=core.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


class CoreRouter(PromptsFacade):
    """Routes the runtime facade's calls over ``clients`` (one per core; ``devices[i]`` names core i)."""

    def __init__(self, clients: Sequence[EngineClient], devices: Sequence[str],
                 spill_threshold: int = SPILL_THRESHOLD) -> None:
        if not clients or len(clients) != len(devices):
            raise ValueError("one device name per engine client, at least one")
        self.clients = list(clients)
        self.devices = list(devices)
        self.spill_threshold = spill_threshold
        self.prompts = self.clients[0].prompts  # one tokenizer for all: the cores serve the same base
        self.in_flight = [0] * len(self.clients)  # this front end's requests running on each core
        self.routed = [0] * len(self.clients)  # requests each core was given
        self.spills = [0] * len(self.clients)  # requests each core took from another's adapter (spill-over)

    # ------------------------------------------------------------------ choosing a core

    def live(self) -> list[int]:
        return [i for i, client in enumerate(self.clients) if client.up]

    @property
    def up(self) -> bool:
        return any(client.up for client in self.clients)

    def preferred(self, adapter_id: str) -> int:
        """The live core ``adapter_id`` belongs to (UNAVAILABLE when none serves)."""
        live = self._live_or_unavailable()
        return max(live, key=lambda i: rendezvous_score(adapter_id, i))

    def pick(self, adapter_id: str) -> int:
        """The core a new request for ``adapter_id`` ("" = the base) runs on, counting a spill-over."""
        live = self._live_or_unavailable()
        least = min(live, key=lambda i: (self.in_flight[i], i))
        if not adapter_id:
            return least
        home = max(live, key=lambda i: rendezvous_score(adapter_id, i))
        if self.in_flight[home] - self.in_flight[least] > self.spill_threshold:
            self.spills[least] += 1
            return least
        return home

    def _live_or_unavailable(self) -> list[int]:
        live = self.live()
        if not live:
            raise Unavailable(DOWN_MESSAGE)
        return live

    def core_labels(self, index: int) -> dict[str, str]:
        """The labels that tell core ``index``'s metrics apart (``cpu,cpu`` names one device twice)."""
        return {"core": str(index), "device": self.devices[index]}

    # ------------------------------------------------------------------ the cores' health

    def core_down(self, index: int, message: str = DOWN_MESSAGE) -> None:
        self.clients[index].core_down(message)

    def core_up(self, index: int) -> None:
        self.clients[index].core_up()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    @property
    def on_adapter_used(self) -> Callable[[str], None] | None:
        return self.clients[0].on_adapter_used

    @on_adapter_used.setter
    def on_adapter_used(self, hook: Callable[[str], None] | None) -> None:
        for client in self.clients:
            client.on_adapter_used = hook

    # ------------------------------------------------------------------ the facade

    def model_info(self) -> ModelInfo:
        return msgspec.structs.replace(self.clients[0].model_info(), device=",".join(self.devices))

    async def core_stats(self) -> list[dict[str, int] | None]:
        """Each core's stats (None for a core that is down)."""
        async def one(client: EngineClient) -> dict[str, int] | None:
            return await client.stats() if client.up else None
        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    async def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for stats in await self.core_stats():
            for key, value in (stats or {}).items():
                total[key] = total.get(key, 0) + value
        return total

    async def call_each(self, method: str, *args: str) -> list[Any]:
        """One core call on every live core: ``[(index, value)]``."""
        live = self.live()
        values = await asyncio.gather(*(self.clients[i].call(method, *args) for i in live))
        return list(zip(live, values, strict=True))

    async def adapter(self, adapter_id: str, field: str = "adapter_id") -> AdapterRef | None:
        """The adapter, loaded on its preferred core (NOT_FOUND, FAILED_PRECONDITION... as that core says)."""
        if not adapter_id:
            return None
        return await self.clients[self.preferred(adapter_id)].adapter(adapter_id, field)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: AdapterRef | None,
                       request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        core = self.pick(adapter.adapter_id if adapter is not None else "")
        self.routed[core] += 1
        self.in_flight[core] += 1
        try:
            async for event in self.clients[core].generate(prompt_ids, params, adapter, request_id):
                yield event
        finally:
            self.in_flight[core] -= 1

    async def load_adapter(self, adapter_id: str) -> AdapterRecord:
        return await self.clients[self.preferred(adapter_id)].load_adapter(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> AdapterRecord:
        """Unloaded from every live core; the answer is the preferred core's."""
        home = self.preferred(adapter_id)
        others = [i for i in self.live() if i != home]
        record = await self.clients[home].unload_adapter(adapter_id)
        await asyncio.gather(*(self.clients[i].unload_adapter(adapter_id) for i in others))
        return record

    async def list_adapters(self) -> list[AdapterRecord]:
        listings = await asyncio.gather(*(self.clients[i].list_adapters() for i in self._live_or_unavailable()))
        return merge_listings(listings)


def merge_listings(listings: Sequence[list[AdapterRecord]]) -> list[AdapterRecord]:
    """One listing from each core's (the same root): per adapter, the most resident state, the latest use."""
    merged: dict[str, AdapterRecord] = {}
    for listing in listings:
        for record in listing:
            seen = merged.get(record.adapter_id)
            if seen is None:
                merged[record.adapter_id] = record
                continue
            last_used = max(seen.last_used, record.last_used)
            if _RESIDENCY.get(record.state, 0) > _RESIDENCY.get(seen.state, 0):
                seen = record
            seen.last_used = last_used
            merged[record.adapter_id] = seen
    return list(merged.values())  # the first listing's order: the store lists the root sorted


def facade(clients: Sequence[EngineClient], devices: Sequence[str | None]) -> EngineClient | CoreRouter:
    """What the RPC handlers call: the one core's client as it is, or a router over several."""
    if len(clients) == 1:
        return clients[0]
    return CoreRouter(clients, [device or "default" for device in devices])


def mark_core(runtime: object, index: int, up: bool) -> None:
    """Tell the facade that core ``index`` died (its requests end UNAVAILABLE) or serves again."""
    if isinstance(runtime, CoreRouter):
        runtime.core_up(index) if up else runtime.core_down(index)
    elif isinstance(runtime, EngineClient):  # else: no engine core (the engine in this process), or not yet
        runtime.core_up() if up else runtime.core_down()


async def core_expositions(runtime: EngineClient | CoreRouter) -> list[tuple[dict[str, str], bytes]]:
    """Each live core's Prometheus text with the labels that tell it from the others (none for a lone core)."""
    if isinstance(runtime, CoreRouter):
        return [(runtime.core_labels(i), text) for i, text in await runtime.call_each("metrics")]
    return [({}, await runtime.call("metrics"))]
