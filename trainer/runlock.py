"""Whether a run's trainer still lives: its lock on the run directory, and its pid with the pid's start time.

The trainer (rank 0) holds an exclusive ``flock`` on ``RUN_DIR/trainer.lock`` from before it writes its
first status until it ends; the kernel drops the lock when the process dies, ``kill -9`` included, so a
held lock means a live trainer even where its pid means nothing (a daemon in a container reading runs that
a trainer on the host writes). Before the child holds the lock (importing torch, seconds) the daemon knows
it by its pid; status.json records the pid's start time (clock ticks since boot, ``/proc/PID/stat``) with
it, so a recycled pid is not taken for the trainer.

``settle`` is the one rule the daemon's ``TrainStatus`` and its metrics collector share: a run whose status
is not final and whose trainer is gone died without finishing; it is recorded ``failed`` (``stopped`` when
a stop had been asked for) in status.json. Standard library only: the daemon imports this without torch.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from .status import (
    FINAL_STATES,
    STATUS_FILE,
    STOP_FILE,
    proc_stat,
    process_start,
    read_status,
    write_json_atomic,
)

LOCK_FILE = "trainer.lock"
LOCK_WAIT_SECONDS = 2.0  # readers hold the lock for microseconds; longer means another trainer has it
log = logging.getLogger("adapterd.trainer")


class RunBusy(Exception):
    """Another live trainer holds the run directory's lock."""


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not count) and, when ``start`` is given, is the process that
    started then, not a later one given the same pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    fields = proc_stat(pid)
    if fields is None:
        return True  # no /proc (not Linux): existence is all that can be known
    if fields[0] == "Z":
        return False
    return start is None or process_start(pid) == int(start)


def acquire(run_dir: Path, wait: float = LOCK_WAIT_SECONDS) -> int:
    """Take the run's lock for this process; returns the file descriptor to pass to ``release``.
    RunBusy when another process keeps it longer than ``wait`` seconds."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    holder = (read_status(run_dir) or {}).get("pid", "?")
                    raise RunBusy(f"{run_dir} is being trained by another process (pid {holder} holds "
                                  f"{LOCK_FILE})") from None
                raise
        time.sleep(0.05)


def release(fd: int) -> None:
    os.close(fd)  # closing the only descriptor drops the flock


def lock_held(run_dir: Path) -> bool | None:
    """True when a live process holds the run's lock, False when none does, None when it cannot be told
    (no lock file yet, or unreadable)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # succeeds only when no trainer holds it exclusively
        return False
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)


def trainer_alive(run_dir: Path, payload: dict[str, Any]) -> bool:
    """Whether the process behind a not-final status still runs. A status without a pid (not written by
    the trainer or the daemon) cannot be judged and counts as alive."""
    if lock_held(run_dir):
        return True
    pid = int(payload.get("pid") or 0)
    if pid <= 0:
        return True
    start = payload.get("pid_start")
    return process_alive(pid, int(start) if start is not None else None)


def mark_dead(run_dir: Path, payload: dict[str, Any], exit_code: int | None = None) -> dict[str, Any]:
    """Record that the trainer ended without writing a final state (re-read first: it may just have).
    ``exit_code``: the process's status when known (the daemon's own child), else None. A read-only runs
    directory still gets the corrected payload back, only not written."""
    latest = read_status(run_dir) or payload
    if latest.get("state") in FINAL_STATES:
        return latest
    if (run_dir / STOP_FILE).exists():
        latest["state"] = "stopped"
        latest["error"] = "stopped before the trainer could write a checkpoint"
    else:
        how = "was killed" if exit_code is None or exit_code < 0 else f"exited with status {exit_code}"
        latest["state"] = "failed"
        latest["error"] = (f"the trainer process (pid {latest.get('pid', '?')}) {how} without finishing; see "
                           f"{run_dir / 'stdout.log'} and {run_dir / 'train.log'}")
    latest["eta_seconds"] = None
    latest["updated_unix"] = time.time()
    try:
        write_json_atomic(run_dir / STATUS_FILE, latest)
    except OSError as exc:
        log.debug("cannot record the end of run %s: %s", run_dir.name, exc)
    return latest


def settle(run_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as it stands: unchanged while final or while its trainer lives, else marked dead."""
    if payload.get("state") in FINAL_STATES or trainer_alive(run_dir, payload):
        return payload
    return mark_dead(run_dir, payload)
