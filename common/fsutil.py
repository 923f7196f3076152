"""Atomic publishing of files and directories: the one way outputs reach their names (status.json, a run's
config and metrics, checkpoints, exported and merged adapters, merged models).

Every output is written under a hidden temporary name beside its target (same filesystem, so the rename is
atomic), its files flushed to disk (``fsync``), then renamed, then the parent directory flushed so that the
rename itself survives a crash. A reader sees the old output or the whole new one, never a part.

Modes follow the umask, as a plain ``open`` / ``mkdir`` would: temporary files are made with ``os.open(...,
0o666)`` and directories with ``os.mkdir`` (``tempfile.mkstemp`` and ``mkdtemp`` make 0600 / 0700, which a
rename would publish, keeping the output from every other reader whatever the umask). Files that a library
wrote into a directory through ``mkstemp`` (safetensors' ``save_file`` inside PEFT's ``save_pretrained``) are
given the umask's mode before the directory is published.

Standard library only: the daemon, the trainer and the merger import it without torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# Serialises the check-then-rename step of concurrent publishers in this process, so that two of them cannot
# both "win" one name.
_COMMIT_LOCK = threading.Lock()


def fsync_path(path: Path) -> None:
    """Flush a file's contents, or a directory's entries (so that a rename into it survives a crash), to
    disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(target: Path, kind: str) -> Path:
    """``.<name>.<kind>-<12 hex>`` beside ``target``: hidden, never the target's name, unique per call."""
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}")


def _create_file(target: Path) -> tuple[int, Path]:
    """A new temporary file beside ``target``, opened for writing, its mode 0666 less the umask."""
    while True:
        path = _temp_name(target, "tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:  # 48 random bits: practically never; then draw another name
            continue


def umask_mode(directory: Path) -> int:
    """0666 less the process umask, the mode ``open`` gives a new file. Found by making a file in
    ``directory``, since ``os.umask`` can only be read by setting it, for every thread at once."""
    fd, probe = _create_file(directory / "umask")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) all at once: temporary file, fsync,
    rename, fsync of the directory. Concurrent writers each have their own temporary file; the last rename
    wins, and a reader sees one whole version."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = _create_file(path)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def seal_tree(directory: Path) -> None:
    """Before publishing ``directory``: give each regular file the umask's mode (see the module docstring)
    and flush every file and directory in it to disk."""
    mode = umask_mode(directory)
    for root, dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            if stat.S_IMODE(path.stat().st_mode) != mode:
                path.chmod(mode)
            fsync_path(path)
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(directory)


def remove_replaced(old: Path) -> None:
    """Remove a replaced output that was moved aside: its files, then the directory. Anything that appeared
    in it since (a directory made meanwhile) is left where it is, never removed with it."""
    for entry in old.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        log.warning("a replaced output was kept at %s: it held entries added while it was replaced", old)


def make_temp_dir(target: Path) -> Path:
    """A new directory ``.<target name>.tmp-<random>`` beside ``target``, its mode from the umask."""
    while True:
        path = _temp_name(target, "tmp")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


class AtomicDir:
    """``with AtomicDir(target) as tmp:`` write into ``tmp``; on a clean exit it is sealed (modes, fsync) and
    becomes ``target``; on any exception (KeyboardInterrupt included) it is removed and ``target`` is as it
    was. A process killed with SIGKILL can leave a hidden ``.<name>.tmp-*`` directory, never the target.

    ``check(target)`` runs before the directory is made and again just before the rename (the target may
    have appeared meanwhile); it raises to refuse. An existing target is replaced only with ``replace``: it is
    moved aside, the new one renamed in, then the old one's files removed (``remove_replaced``); without it,
    FileExistsError.
    """

    def __init__(self, target: Path, *, replace: bool = False,
                 check: Callable[[Path], None] | None = None) -> None:
        self.target = Path(target)
        self.replace = replace
        self.check = check
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self._check()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp_dir(self.target)
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                seal_tree(self.tmp)
                self._commit(self.tmp)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _check(self) -> None:
        if self.check is not None:
            self.check(self.target)
        if not self.replace and os.path.lexists(self.target):
            raise FileExistsError(f"{self.target} already exists")

    def _commit(self, tmp: Path) -> None:
        """Rename ``tmp`` to the target; a replaced target is moved aside first, removed after."""
        with _COMMIT_LOCK:
            self._check()
            old: Path | None = None
            if os.path.lexists(self.target):
                old = _temp_name(self.target, "old")
                os.rename(self.target, old)
            try:
                os.rename(tmp, self.target)
            except BaseException:
                if old is not None:
                    os.rename(old, self.target)
                raise
        fsync_path(self.target.parent)
        if old is not None:
            remove_replaced(old)
