"""How the front end answers its engine core's deaths (``EngineProcess``): each death is reported, a core that
dies soon after it began to serve is started again after a growing pause, and the sixth short life in a row gives
up (the daemon then exits 1). Driven on the event loop with stand-in processes, so that every restart costs no
process start; tests/server/test_isolation.py runs the same path end to end with a real ``adapterd serve``."""

from __future__ import annotations

import asyncio
import os
import time
import types

import pytest

from adapterd.server.core import process as core_process
from adapterd.server.core.process import MAX_RESTARTS, SHORT_LIFE_S, EngineProcess


class _Ended:
    """A core process that has ended with ``exitcode`` (what ``_exited`` reads of a multiprocessing Process)."""

    def __init__(self, exitcode: int, sentinel: int) -> None:
        self.exitcode, self.sentinel = exitcode, sentinel

    def join(self, timeout: float | None = None) -> None:
        pass


class _Watched:
    """An ``EngineProcess`` whose ``start`` only records that a new core serves, with its callbacks recorded."""

    def __init__(self) -> None:
        self.downs: list[str] = []
        self.ups = 0
        self.give_ups: list[str] = []
        self.starts = 0
        self.core = EngineProcess(None, self.downs.append, self._up, self.give_ups.append)
        self.core.start = self._start
        self.core._ready_at = time.monotonic()  # the first core serves

    def _up(self) -> None:
        self.ups += 1

    async def _start(self) -> None:
        self.starts += 1
        self.core._ready_at = time.monotonic()

    async def dies(self, exitcode: int, sentinel: int) -> None:
        """The current core ends; any restart it causes runs to its end."""
        before = self.core._restart
        self.core._exited(_Ended(exitcode, sentinel))
        if self.core._restart is not before:
            await self.core._restart


@pytest.fixture()
def pauses(monkeypatch) -> list[float]:
    """The pauses before each restart, in seconds, taken without waiting them. Only process.py's ``asyncio`` is
    replaced: a daemon's event loop running in another thread of this process keeps the real ``sleep``."""
    taken: list[float] = []

    async def sleep(seconds: float) -> None:
        taken.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(core_process, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))
    return taken


@pytest.fixture()
def sentinel():
    read, write = os.pipe()
    yield read
    os.close(read)
    os.close(write)


def test_a_core_that_keeps_dying_is_restarted_five_times_with_growing_pauses_then_given_up(pauses, sentinel):
    async def scenario() -> _Watched:
        watched = _Watched()
        for _ in range(MAX_RESTARTS + 1):
            await watched.dies(core_process.EXIT_BROKEN, sentinel)
        return watched

    watched = asyncio.run(scenario())
    assert MAX_RESTARTS == 5  # the README promises five restarts in a row
    assert watched.starts == watched.ups == 5
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0]  # a crash loop must not spin
    assert watched.downs == [f"the engine core exited with status {core_process.EXIT_BROKEN}"] * 6
    assert len(watched.give_ups) == 1
    assert "died 6 times in a row" in watched.give_ups[0] and f"within {SHORT_LIFE_S:.0f} s" in watched.give_ups[0]


def test_a_core_that_served_a_while_starts_the_count_again(pauses, sentinel):
    async def scenario() -> _Watched:
        watched = _Watched()
        for _ in range(MAX_RESTARTS):  # five short lives: one more would give up
            await watched.dies(-9, sentinel)
        watched.core._ready_at = time.monotonic() - SHORT_LIFE_S - 1  # the fifth restart served past a minute
        await watched.dies(-9, sentinel)
        return watched

    watched = asyncio.run(scenario())
    assert watched.give_ups == [] and watched.starts == 6
    assert pauses[-1] == 0.5  # counted as the first death again
    assert watched.downs[-1] == "the engine core was killed by signal 9"


def test_a_stopped_core_is_not_reported_or_restarted(pauses, sentinel):
    async def scenario() -> _Watched:
        watched = _Watched()
        watched.core._stopping = True  # the daemon stops it (SIGTERM): its exit is expected
        await watched.dies(0, sentinel)
        return watched

    watched = asyncio.run(scenario())
    assert (watched.downs, watched.give_ups, watched.starts, pauses) == ([], [], 0, [])
