"""The engine-core process: how the daemon starts it, watches it and starts it again.

The core owns the device, the model, the adapter store, the LoRA slots and the key/value pool (``Runtime`` and
``EngineCore``); the gRPC front end owns the network. Two processes, two GILs: the engine's host thread never
waits for response serialization again (issue 14; bench/NOTES.md, "gRPC end to end").

- Start-up: the front end spawns the core (a fresh interpreter: ``spawn``, never ``fork``, which would copy a
  process with threads and, on a GPU, a CUDA context). The core loads the base model and reports "ready"
  (or the load error) on a pipe, then serves on an ``ipc://`` socket in a private temporary directory.
- Death: the front end watches the process's sentinel. A core that dies (OOM-kill, segfault, ``kill -9``, a
  device failure it cannot recover from) is reported at once (``on_down``: in-flight requests end with
  UNAVAILABLE, health turns NOT_SERVING) and started again; ``on_up`` follows when the new one is ready.
  A core that keeps dying within a minute of serving gives up after five restarts in a row (``on_give_up``:
  the daemon exits 1 so that its own supervisor restarts it, or an operator looks).
- Orphans: the core asks the kernel for SIGKILL when the thread that spawned it ends (``PR_SET_PDEATHSIG``),
  so a killed daemon never leaves an engine holding the GPU.
- Stop: SIGTERM to the core stops its engine (rows still running end with UNAVAILABLE) and it exits 0.
- Sockets: the core's and each front end's ``ipc://`` sockets live in private directories (``private_dir``)
  named after the process that made them. A clean stop removes them; the directories of a process that died
  without doing so (``kill -9``) are removed by the next daemon of the same user that starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.util
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from ..engine import EngineConfig

log = logging.getLogger(__name__)

SHORT_LIFE_S = 60.0  # a core that dies within this long of serving counts towards giving up, seconds
MAX_RESTARTS = 5  # short lives in a row before the daemon gives up
EXIT_BROKEN = 3  # the core's exit status when its engine cannot serve any more (device failure)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15  # <linux/prctl.h>: the name ps, top and /proc/<pid>/comm show (15 bytes at most)
CORE_PROCESS_NAME = "adapterd-core"


@dataclass(frozen=True)
class CoreSpec:
    """Everything the core process needs to build its runtime (picklable plain data)."""

    base: Path
    adapters: Path
    quantization: str
    engine: EngineConfig
    device: str | None
    dtype: str | None
    max_loaded_adapter_bytes: int | None
    address: str
    metrics: bool
    log_level: str = "INFO"
    gil_switch_interval_s: float = 0.0002  # the I/O thread must not wait 5 ms (Python's default) for the GIL


def core_main(spec: CoreSpec, ready: Connection, parent_pid: int) -> None:
    """The core process's entry point (spawned by ``EngineProcess``)."""
    _die_with_parent(parent_pid)
    name_process(CORE_PROCESS_NAME)
    sys.setswitchinterval(spec.gil_switch_interval_s)  # the engine thread shares the GIL with the I/O thread
    logging.basicConfig(level=spec.log_level, format="%(asctime)s engine-core %(levelname)s %(name)s: %(message)s")
    from ..runtime import Runtime
    from .engine_core import EngineCore

    try:
        runtime = Runtime.load(spec.base, spec.adapters, spec.quantization, spec.engine, spec.device, spec.dtype,
                               None, spec.max_loaded_adapter_bytes)
        exposition = _core_metrics(runtime) if spec.metrics else None
        core = EngineCore(runtime, spec.address, exposition)
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which says it in one line
        log.debug("the engine core could not start", exc_info=True)
        ready.send(("failed", str(exc) or type(exc).__name__))
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: core.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the whole group: the front end decides
    runtime.engine.breakage.listen(lambda reason: core.stop())
    ready.send(("ready", None))
    ready.close()
    core.serve()
    broken = runtime.engine.breakage.reason is not None
    runtime.close()
    core.close()
    # Nothing is left to run: skip the interpreter's teardown of torch and the model (about 1.4 s of the 3 s a
    # stop took on the CPU machine, measured), which every stop and restart would otherwise wait for. What
    # multiprocessing itself runs when a child ends still runs (its finalizers unlink the named semaphores
    # that libraries made, such as tqdm's lock).
    multiprocessing.util._exit_function()
    logging.shutdown()
    os._exit(EXIT_BROKEN if broken else 0)


def private_dir(kind: str) -> str:
    """A new directory only this user can enter (``mkdtemp``: mode 0700) for ``kind``'s sockets ("core",
    "outputs"), named ``adapterd-KIND-PID-*`` after this process; stale ones are swept first."""
    sweep_private_dirs(kind)
    return tempfile.mkdtemp(prefix=f"adapterd-{kind}-{os.getpid()}-")


def sweep_private_dirs(kind: str) -> None:
    """Remove this user's ``adapterd-KIND-PID-*`` directories whose process has died (a ``kill -9`` leaves
    them, each with its socket file). A live process's are kept, whoever it is. (Daemons in other PID
    namespaces must not share this temporary directory: their processes would look dead here.)"""
    named = re.compile(rf"adapterd-{re.escape(kind)}-(\d+)-")
    for path in Path(tempfile.gettempdir()).glob(f"adapterd-{kind}-*"):
        match = named.match(path.name)
        try:
            info = path.lstat()
        except OSError:
            continue
        if match is None or info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode) or _alive(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)


def remove_private_dir(address: str) -> None:
    """Remove the directory of an ``ipc://`` address that ``private_dir`` made (any other is left alone)."""
    directory = Path(address.removeprefix("ipc://")).parent
    if address.startswith("ipc://") and directory.name.startswith("adapterd-"):
        shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive all the same
        pass
    return True


def frontend_process_name(index: int) -> str:
    """Front end ``index``'s (>= 1) process name; index 0, the first, is the `adapterd serve` process itself."""
    return f"adapterd-fe{index + 1}"


def name_process(name: str) -> None:
    """Name this process for ps and top (a spawned child otherwise shows as "python3", like every other)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _core_metrics(runtime) -> Callable[[], bytes]:
    """The engine's own metrics (queue, latency, batch, adapters resident, kernels, GPU), exported through the
    front end's ``/metrics`` (``server/metrics/remote.py``)."""
    from ..metrics import DaemonMetrics

    metrics = DaemonMetrics(process_namespace="adapterd_engine")
    metrics.attach(runtime)
    return metrics.exposition


class EngineProcess:
    """The front end's handle on the core process: start, watch, restart, stop."""

    def __init__(self, spec: CoreSpec, on_down: Callable[[str], None], on_up: Callable[[], None],
                 on_give_up: Callable[[str], None]) -> None:
        self.spec = spec
        self.on_down, self.on_up, self.on_give_up = on_down, on_up, on_give_up
        self.process: multiprocessing.process.BaseProcess | None = None
        self._context = multiprocessing.get_context("spawn")
        self._short_lives = 0  # deaths in a row, each within SHORT_LIFE_S of serving
        self._ready_at = 0.0  # time.monotonic() when the current core began to serve
        self._stopping = False
        self._restart: asyncio.Task | None = None

    @staticmethod
    def private_address() -> str:
        """An ``ipc://`` address in a new directory only this user can enter (``private_dir``)."""
        return f"ipc://{private_dir('core')}/engine.sock"

    async def start(self) -> None:
        """Spawn the core and wait until it serves; RuntimeError with its reason if it cannot start."""
        receiving, sending = self._context.Pipe(duplex=False)
        process = self._context.Process(target=core_main, args=(self.spec, sending, os.getpid()),
                                        name="adapterd-engine-core", daemon=True)
        process.start()  # on the event loop's thread, which lives as long as the daemon (PR_SET_PDEATHSIG)
        sending.close()
        self.process = process
        try:
            status, reason = await asyncio.to_thread(_wait_ready, receiving)
        finally:
            receiving.close()
        if status != "ready":
            await asyncio.to_thread(process.join, 10)
            raise RuntimeError(reason)
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, process)
        self._ready_at = time.monotonic()
        log.info("engine core ready (pid %d)", process.pid)

    def _exited(self, process: multiprocessing.process.BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join(5)  # the sentinel is ready: it has exited, and this reaps it (exitcode)
        if self._stopping:
            return
        code = process.exitcode
        reason = (f"the engine core was killed by signal {-code}" if code is not None and code < 0
                  else f"the engine core exited with status {code}")
        self.on_down(reason)
        short = time.monotonic() - self._ready_at < SHORT_LIFE_S
        self._short_lives = self._short_lives + 1 if short else 1
        if self._short_lives > MAX_RESTARTS:
            log.error("%s", reason)
            self.on_give_up(f"{reason}; it died {self._short_lives} times in a row, each within "
                            f"{SHORT_LIFE_S:.0f} s of serving")
            return
        log.error("%s; starting a new one", reason)
        self._restart = asyncio.ensure_future(self._start_again(self._short_lives))

    async def _start_again(self, attempt: int) -> None:
        await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 10.0))  # seconds; a crash loop must not spin
        try:
            await self.start()
        except Exception as exc:  # noqa: BLE001 - a base that loaded once and now cannot: give up
            self.on_give_up(f"the engine core could not start again: {exc}")
            return
        self.on_up()

    async def stop(self, timeout: float) -> bool:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; True if it exited by itself. Its socket's
        directory goes with it."""
        try:
            return await self._stop(timeout)
        finally:
            remove_private_dir(self.spec.address)

    async def _stop(self, timeout: float) -> bool:
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        process = self.process
        if process is None or process.exitcode is not None:
            return True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(process.sentinel)
        process.terminate()
        await asyncio.to_thread(process.join, timeout)
        if process.exitcode is None:
            log.error("the engine core did not stop within %.0f s: killing it", timeout)
            process.kill()
            await asyncio.to_thread(process.join, 5)
            return False
        return True


def _wait_ready(connection: Connection) -> tuple[str, str | None]:
    try:
        return connection.recv()
    except EOFError:
        return "failed", "the engine core ended while starting (see its log lines above)"
