"""More gRPC front ends on the same port (``--frontends N``), all feeding the engine cores (one per ``--device``).

A front end's work grows with the number of streams (gRPC's message handling, detokenizing, stop sequences),
so one event loop on one core caps the tokens a daemon can deliver. The first front end (the ``adapterd
serve`` process) starts the engine core and ``N - 1`` more front-end processes; each listens on the same port
with SO_REUSEPORT, the kernel spreading connections among them, and talks to the core itself.

The first front end is their supervisor, over one pipe each:
- to them: ``("down", core, reason)`` / ``("up", core)`` when engine core number ``core`` dies and serves
  again (its requests in flight end UNAVAILABLE, health follows), ``("stop", grace)`` on SIGTERM (each
  drains as the first does), and ``("metrics",)``, answered with the front end's exposition (its RPC
  series join ``/metrics``, ``server/metrics/remote.py``);
- from them: ``("ready",)``, then the metrics answers.
A front end whose pipe closes (the first one died, even by ``kill -9``) exits; one that dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection

from ..config import ServerConfig
from .process import frontend_process_name, name_process

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a front end imports grpc and transformers and loads the tokenizer, seconds
METRICS_TIMEOUT_S = 2.0  # a scrape waits this long for each front end, seconds


def default_frontends() -> int:
    """One front end per four cores, at least one and at most eight: each uses about one core at full load,
    and the engine core, the client processes and the kernel need the rest."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def frontend_count(config: ServerConfig) -> int:
    """How many front ends ``config`` asks for (one without an engine-core process)."""
    if not config.engine_process:
        return 1
    return config.frontends or default_frontends()


def make_shared_budgets(config: ServerConfig) -> tuple[object | None, object]:
    """The concurrent-RPC budgets as semaphores every front end takes from (``limits.RpcBudget.shared``)."""
    context = multiprocessing.get_context("spawn")
    callers = (context.BoundedSemaphore(config.max_concurrent_rpcs) if config.max_concurrent_rpcs is not None
               else None)
    return callers, context.BoundedSemaphore(config.max_open_rpcs)


class FrontEnd:
    """The first front end's handle on another one."""

    def __init__(self, index: int, process: multiprocessing.process.BaseProcess, pipe: Connection) -> None:
        self.index, self.process, self.pipe = index, process, pipe
        self.lock = threading.Lock()  # the event loop tells, the metrics thread asks: one at a time

    def tell(self, *message: object) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.pipe.send(message)

    def exposition(self) -> bytes:
        with self.lock:
            self.pipe.send(("metrics",))
            if not self.pipe.poll(METRICS_TIMEOUT_S):
                raise TimeoutError(f"front end {self.index} did not answer")
            return self.pipe.recv()[1]


class FrontEnds:
    """Starts, watches and stops front ends 1..N-1 of a daemon serving ``config`` on ``port``."""

    def __init__(self, config: ServerConfig, port: int, core_addresses: list[str], budgets: tuple) -> None:
        self.config = dataclasses.replace(config, port=port)
        self.core_addresses = core_addresses
        self.budgets = budgets
        self.members: list[FrontEnd] = []
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False
        self.log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())

    async def start(self, count: int) -> None:
        await asyncio.gather(*(self._start(index) for index in range(1, count)))

    async def _start(self, index: int) -> None:
        mine, theirs = self._context.Pipe()
        process = self._context.Process(target=frontend_main, args=(self.config, index, self.core_addresses, theirs,
                                                                            self.log_level, self.budgets),
                                        name=f"adapterd-frontend-{index}", daemon=True)
        process.start()
        theirs.close()
        if not await asyncio.to_thread(mine.poll, READY_TIMEOUT_S) or mine.recv() != ("ready",):
            process.kill()
            raise RuntimeError(f"front end {index} did not start")
        member = FrontEnd(index, process, mine)
        self.members = [m for m in self.members if m.index != index] + [member]
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, member)

    def _exited(self, member: FrontEnd) -> None:
        asyncio.get_running_loop().remove_reader(member.process.sentinel)
        member.process.join(5)
        if self._stopping:
            return
        log.error("front end %d exited with status %s; starting it again", member.index, member.process.exitcode)
        asyncio.ensure_future(self._start(member.index))

    def tell(self, *message: object) -> None:
        for member in self.members:
            member.tell(*message)

    def expositions(self) -> list[bytes]:
        out = []
        for member in list(self.members):
            try:
                out.append(member.exposition())
            except (OSError, EOFError, TimeoutError) as exc:
                log.warning("front end %d's metrics are missing from this scrape: %s", member.index, exc)
        return out

    async def stop(self, grace: float) -> bool:
        """Each drains for up to ``grace`` seconds, as the first does; True if all exited by themselves."""
        self._stopping = True
        self.tell("stop", grace)
        clean = True
        for member in self.members:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(member.process.sentinel)
            await asyncio.to_thread(member.process.join, grace + 10)
            if member.process.exitcode is None:
                member.process.kill()
                clean = False
        return clean


def frontend_main(config: ServerConfig, index: int, core_addresses: list[str], pipe: Connection, log_level: str,
                  budgets: tuple) -> None:
    """Front end ``index`` (>= 1): its own gRPC server on the shared port, its own clients of the cores."""
    name_process(frontend_process_name(index))
    logging.basicConfig(level=log_level, format=f"%(asctime)s frontend-{index} %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first front end decides (it tells us "stop")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_serve_frontend(config, index, core_addresses, pipe, budgets))


async def _serve_frontend(config: ServerConfig, index: int, core_addresses: list[str], pipe: Connection,
                          budgets: tuple) -> None:
    from ..app import start_daemon

    daemon = await start_daemon(config, share_port=True, frontend_index=index, shared_budgets=budgets)
    await daemon.attach_engine_cores(core_addresses)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future = loop.create_future()
    pipe.send(("ready",))

    def listen() -> None:  # a thread: the pipe's messages, until it closes
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(0.0))
                return
            if message[0] == "metrics":
                pipe.send(("metrics", daemon.metrics.local_exposition() if daemon.metrics else b""))
            elif message[0] == "stop":
                loop.call_soon_threadsafe(lambda g=message[1]: stop.done() or stop.set_result(g))
            elif message[0] == "down":
                loop.call_soon_threadsafe(daemon.engine_core_down, message[1], message[2])
            elif message[0] == "up":
                loop.call_soon_threadsafe(daemon.engine_core_up, message[1])

    threading.Thread(target=listen, name="adapterd-frontend-pipe", daemon=True).start()
    grace = await stop
    await daemon.shutdown(grace)
