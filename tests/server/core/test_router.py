"""The router over several engine cores (``server/core/router.py``), without processes: which core each request
goes to (an adapter's preferred core by rendezvous hashing, spill-over under imbalance, the base to the least
loaded), dead cores routed around, and the calls that go to one core or to all. Cores here are stand-ins that
record what reaches them; tests/server/core/test_multi_core.py runs the same over real engine cores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from adapterd.server.adapters.store import ON_DISK, RESIDENT_CPU, RESIDENT_GPU, AdapterRecord
from adapterd.server.core.protocol import AdapterRef, ModelInfo
from adapterd.server.core.router import CoreRouter, merge_listings, rendezvous_score
from adapterd.server.engine.request import GenerationEvent, GenerationParams
from adapterd.server.errors import NotFound, Unavailable

INFO = ModelInfo(base_model="tiny", model_type="llama", quantization="none", dtype="float32", device="cpu",
                 max_sequence_length=128, max_batch_size=4, max_lora_rank=16, adapter_slots=4, vocab_size=100)


class Core:
    """What the router needs of an ``EngineClient``; records the calls that reach it."""

    def __init__(self, listing: list[AdapterRecord] | None = None) -> None:
        self.up = True
        self.prompts = None
        self.on_adapter_used = None
        self.calls: list[tuple[str, str]] = []
        self.listing = listing or []
        self.release = asyncio.Event()  # a generate's stream ends once this is set

    def model_info(self) -> ModelInfo:
        return INFO

    def core_down(self, message: str = "") -> None:
        self.up = False

    def core_up(self) -> None:
        self.up = True

    async def stats(self) -> dict[str, int]:
        return {"running": 1, "waiting": 2}

    async def adapter(self, adapter_id: str, field: str = "adapter_id") -> AdapterRef:
        self.calls.append(("adapter", adapter_id))
        return AdapterRef(adapter_id, "LORA")

    async def generate(self, prompt_ids, params, adapter, request_id=None) -> AsyncIterator[GenerationEvent]:
        self.calls.append(("generate", adapter.adapter_id if adapter else ""))
        yield GenerationEvent("start")
        await self.release.wait()
        yield GenerationEvent("end")

    async def load_adapter(self, adapter_id: str) -> AdapterRecord:
        self.calls.append(("load", adapter_id))
        return AdapterRecord(adapter_id, state=RESIDENT_CPU)

    async def unload_adapter(self, adapter_id: str) -> AdapterRecord:
        self.calls.append(("unload", adapter_id))
        if adapter_id == "missing":
            raise NotFound("unknown adapter", field="adapter_id")
        return AdapterRecord(adapter_id, state=ON_DISK)

    async def list_adapters(self) -> list[AdapterRecord]:
        return [AdapterRecord(r.adapter_id, state=r.state, last_used=r.last_used) for r in self.listing]


def _router(n: int = 2, spill_threshold: int = 2) -> tuple[CoreRouter, list[Core]]:
    cores = [Core() for _ in range(n)]
    return CoreRouter(cores, [f"cpu:{i}" for i in range(n)], spill_threshold), cores


def _home(adapter_id: str, cores: list[int]) -> int:
    return max(cores, key=lambda i: rendezvous_score(adapter_id, i))


def _adapter_on(core: int, n: int = 2) -> str:
    """An adapter id whose preferred core among ``n`` is ``core``."""
    return next(f"a{k}" for k in range(1000) if _home(f"a{k}", list(range(n))) == core)


async def _hold(router: CoreRouter, adapter_id: str) -> asyncio.Task:
    """A request that stays in flight until its core's ``release`` is set; returned once it is routed."""
    ref = AdapterRef(adapter_id, "LORA") if adapter_id else None
    started = asyncio.Event()

    async def run() -> None:
        async for event in router.generate([1, 2], GenerationParams(max_new_tokens=4), ref):
            if event.kind == "start":
                started.set()

    task = asyncio.ensure_future(run())
    await asyncio.wait({task, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # routing refused it: raise here
    return task


async def _finish(cores: list[Core], held: list[asyncio.Task]) -> None:
    """End every held request."""
    for core in cores:
        core.release.set()
    await asyncio.gather(*held)


def test_scores_are_stable_across_processes_and_spread_adapters_over_the_cores():
    assert rendezvous_score("support/v2", 1) == rendezvous_score("support/v2", 1)  # not Python's salted hash
    assert rendezvous_score("support/v2", 0) != rendezvous_score("support/v2", 1)
    homes = [_home(f"tenant-{k}", [0, 1]) for k in range(1000)]
    assert 400 < homes.count(0) < 600  # about half each


def test_a_dead_core_moves_only_its_own_adapters_and_they_come_back():
    ids = [f"tenant-{k}" for k in range(300)]
    before = {a: _home(a, [0, 1, 2]) for a in ids}
    after = {a: _home(a, [0, 2]) for a in ids}  # core 1 died
    assert all(after[a] == before[a] for a in ids if before[a] != 1)
    assert {after[a] for a in ids if before[a] == 1} == {0, 2}  # its adapters spread over the others

    async def main() -> None:
        router, cores = _router(3)
        moved = next(a for a in ids if before[a] == 1)
        assert router.pick(moved) == 1
        router.core_down(1)
        assert router.pick(moved) == after[moved]
        router.core_up(1)
        assert router.pick(moved) == 1

    asyncio.run(main())


def test_requests_for_one_adapter_land_on_one_core_while_the_load_is_even():
    async def main() -> None:
        router, cores = _router(spill_threshold=2)
        adapter = _adapter_on(1)
        held = [await _hold(router, adapter) for _ in range(3)]
        assert cores[1].calls == [("generate", adapter)] * 3 and cores[0].calls == []
        await _finish(cores, held)
        assert router.in_flight == [0, 0] and router.routed == [0, 3] and router.spills == [0, 0]

    asyncio.run(main())


def test_a_core_too_far_ahead_spills_to_the_least_loaded_and_counts_it():
    async def main() -> None:
        router, cores = _router(spill_threshold=2)
        adapter = _adapter_on(0)
        held = [await _hold(router, adapter) for _ in range(4)]  # 0, 1, 2 ahead: home; 3 ahead: spill
        assert [c[1] for c in cores[0].calls] == [adapter] * 3
        assert cores[1].calls == [("generate", adapter)]
        assert router.spills == [0, 1] and router.in_flight == [3, 1]
        await _finish(cores, held)

    asyncio.run(main())


def test_base_requests_go_to_the_least_loaded_core():
    async def main() -> None:
        router, cores = _router(spill_threshold=100)
        held = [await _hold(router, _adapter_on(0)) for _ in range(2)]
        held.append(await _hold(router, ""))
        held.append(await _hold(router, ""))
        assert cores[1].calls == [("generate", "")] * 2
        held.append(await _hold(router, ""))  # now even: the lower index
        assert cores[0].calls[-1] == ("generate", "")
        await _finish(cores, held)

    asyncio.run(main())


def test_no_live_core_is_unavailable_and_health_follows_any_core():
    async def main() -> None:
        router, cores = _router()
        router.core_down(0)
        assert router.up
        await router.adapter(_adapter_on(0))  # resolved on the core that still serves
        assert cores[1].calls == [("adapter", _adapter_on(0))]
        router.core_down(1)
        assert not router.up
        with pytest.raises(Unavailable):
            await router.adapter("x")
        with pytest.raises(Unavailable):
            await _hold(router, "")
        with pytest.raises(Unavailable):
            await router.list_adapters()

    asyncio.run(main())


def test_load_goes_to_the_preferred_core_and_unload_to_every_live_core():
    async def main() -> None:
        router, cores = _router()
        adapter = _adapter_on(1)
        assert (await router.load_adapter(adapter)).state == RESIDENT_CPU
        assert cores[1].calls == [("load", adapter)] and cores[0].calls == []
        assert (await router.unload_adapter(adapter)).state == ON_DISK
        assert ("unload", adapter) in cores[0].calls and ("unload", adapter) in cores[1].calls
        with pytest.raises(NotFound):
            await router.unload_adapter("missing")

    asyncio.run(main())


def test_the_listing_is_one_with_the_most_resident_state_and_the_latest_use():
    a = [AdapterRecord("a", state=ON_DISK, last_used=5.0), AdapterRecord("b", state=RESIDENT_GPU, last_used=1.0)]
    b = [AdapterRecord("a", state=RESIDENT_GPU, last_used=2.0), AdapterRecord("b", state=ON_DISK, last_used=9.0)]
    merged = merge_listings([a, b])
    assert [(r.adapter_id, r.state, r.last_used) for r in merged] == [("a", RESIDENT_GPU, 5.0),
                                                                       ("b", RESIDENT_GPU, 9.0)]


def test_model_info_names_every_device_and_stats_add_up():
    async def main() -> None:
        router, _ = _router()
        assert router.model_info().device == "cpu:0,cpu:1"
        assert await router.stats() == {"running": 2, "waiting": 4}
        router.core_down(1)
        assert await router.core_stats() == [{"running": 1, "waiting": 2}, None]
        assert await router.stats() == {"running": 1, "waiting": 2}

    asyncio.run(main())
