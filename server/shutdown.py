"""SIGTERM always ends the process within ``--grace`` plus a margin, whatever a request or a file is doing.

The drain itself is ``Daemon.shutdown`` (health NOT_SERVING, new calls UNAVAILABLE, calls in flight get
``grace`` seconds, then grpc cancels them). What can still keep a process alive after that, and what this
module does about each:

- a worker thread blocked in a file read (a FIFO named ``adapter_config.json``): the handler awaiting it was
  cancelled with its call, but the thread cannot be interrupted, and Python joins worker threads at exit.
  The daemon's worker pool is joined for a bounded time; threads still blocked then are named in one log
  line and the process ends with ``os._exit(0)``: every call has been answered and the engine has stopped.
- an event loop that is itself blocked (a handler doing a blocking read on it, a call that ignores its
  cancellation): the SIGTERM handler is a plain ``signal.signal`` handler, so it runs even while the loop is
  stuck in a system call, and it arms ``faulthandler``'s watchdog, a C thread that needs no GIL: at
  ``grace + SHUTDOWN_MARGIN_S`` it writes every thread's traceback to stderr and exits with status 1.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SHUTDOWN_MARGIN_S = 10.0  # beyond --grace: stopping the engine and joining worker threads, seconds
WORKER_JOIN_S = 2.0  # how long idle or finishing worker threads get to end after the drain, seconds


class Shutdown:
    """Signal handling, the worker pool the loop's ``asyncio.to_thread`` uses, and the last resort exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self.loop = loop
        self.grace = grace
        self.requested = asyncio.Event()
        self._armed = False
        self._previous: dict[int, Any] = {}
        # The loop's default executor, owned here so that it can be joined with a time limit at the end.
        self.workers = ThreadPoolExecutor(thread_name_prefix="adapterd-worker")
        loop.set_default_executor(self.workers)

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def uninstall(self) -> None:
        """Put the previous handlers back (``serve`` may run inside a longer-lived process: tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        faulthandler.cancel_dump_traceback_later()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:
            self._armed = True
            faulthandler.dump_traceback_later(self.grace + SHUTDOWN_MARGIN_S, exit=True)
        self.loop.call_soon_threadsafe(self.requested.set)

    def finish(self, drained: bool) -> None:
        """After ``Daemon.shutdown``: return if nothing is left running, else end the process now."""
        stuck = self._join_workers(WORKER_JOIN_S)
        if drained and not stuck:
            faulthandler.cancel_dump_traceback_later()
            return
        if not drained:
            exit_now(1, "calls did not end within the grace period and its margin; exiting anyway")
        exit_now(0, f"drained; {len(stuck)} worker thread(s) still blocked ({', '.join(stuck)}), "
                    "probably in a file read; exiting without them")

    def _join_workers(self, seconds: float) -> list[str]:
        """Shut the worker pool down, waiting at most ``seconds``; the names of threads still alive."""
        self.workers.shutdown(wait=False, cancel_futures=True)
        joiner = threading.Thread(target=self.workers.shutdown, kwargs={"wait": True}, daemon=True)
        joiner.start()
        joiner.join(seconds)
        return sorted(t.name for t in threading.enumerate()
                      if t.is_alive() and t.name.startswith("adapterd-worker"))


def exit_now(code: int, message: str) -> None:
    """One log line, logs and streams flushed, then ``os._exit``: interpreter shutdown would wait for the
    blocked threads."""
    (log.info if code == 0 else log.error)("%s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
