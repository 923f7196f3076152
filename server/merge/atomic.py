"""Publish a directory all at once: build it under a hidden temporary name beside the target, then rename.

The temporary directory is a sibling of the target, so it is on the same filesystem and ``os.rename`` is
atomic: a reader sees either no directory or a complete one. Any failure (bad adapter, disk full, a
progress callback that raises to cancel, KeyboardInterrupt) removes the temporary directory, so nothing that
looks like a model or an adapter is left behind. A process killed with SIGKILL can leave a hidden
``.<name>.tmp-*`` directory; it never has the target's name.

The temporary directory is made with ``os.mkdir``, not ``tempfile.mkdtemp``: mkdtemp's mode is 0700, which the
rename would publish, so a merged model or adapter could be read by its owner alone. ``os.mkdir`` follows the
process umask, like every file written into the directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from types import TracebackType

from ...common.fsutil import fsync_dir
from ..errors import AlreadyExists, FailedPrecondition

log = logging.getLogger(__name__)

# Serialises the check-then-rename step of concurrent merges, so two of them cannot both "win" one name.
_COMMIT_LOCK = threading.Lock()


def check_target(target: Path, overwrite: bool, marker: str, field: str) -> None:
    """Raise unless ``target`` may be written: absent, or (with ``overwrite``) an empty directory or one
    holding ``marker`` (``config.json`` for a model, ``adapter_config.json`` for an adapter) and nothing but
    files. Messages never name the server's path.

    The marker rule keeps ``overwrite`` from replacing, say, a home directory given by mistake; the files-only
    rule keeps it from removing anything but the one output it replaces: an adapter id with other adapters
    nested under it (``team`` over ``team/v2``) is refused rather than taking them along.
    """
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise AlreadyExists("the output already exists (set overwrite to replace it)", field=field)
    if target.is_symlink() or not target.is_dir():
        raise FailedPrecondition("the output exists and is not a directory; refusing to replace it", field=field)
    entries = list(target.iterdir())
    if entries and not (target / marker).is_file():
        raise FailedPrecondition(f"the output exists and holds no {marker}; refusing to replace a directory "
                                 "that does not look like a previous output", field=field)
    nested = sorted(e.name for e in entries if e.is_dir())
    if nested:
        raise FailedPrecondition(f"the output holds other directories ({', '.join(n[:80] for n in nested[:3])}"
                                 f"{', ...' if len(nested) > 3 else ''}), which overwrite would remove; move "
                                 "them or choose another output", field=field)


def remove_replaced(old: Path) -> None:
    """Remove a replaced output that was moved aside: its files, then the directory. Anything that appeared
    in it since the check (a directory made meanwhile) is left where it is, never removed with it."""
    for entry in old.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        log.warning("a replaced output was kept at %s: it held entries added while it was replaced", old)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory ``parent/<prefix><random>``, its mode from the umask (see the module docstring)."""
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # 48 random bits: practically never; then draw another name
            continue


class AtomicDir:
    """``with AtomicDir(target, ...) as tmp:`` write into ``tmp``; on a clean exit it becomes ``target``."""

    def __init__(self, target: Path, *, overwrite: bool, marker: str, field: str) -> None:
        self.target = target
        self.overwrite = overwrite
        self.marker = marker
        self.field = field
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_target(self.target, self.overwrite, self.marker, self.field)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp_dir(self.target.parent, f".{self.target.name}.tmp-")
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                self._commit(self.tmp)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _commit(self, tmp: Path) -> None:
        """Rename ``tmp`` to the target; an overwritten target is moved aside first, removed after."""
        with _COMMIT_LOCK:
            check_target(self.target, self.overwrite, self.marker, self.field)
            old: Path | None = None
            if os.path.lexists(self.target):
                old = self.target.with_name(f".{self.target.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(self.target, old)
            try:
                os.rename(tmp, self.target)
            except BaseException:
                if old is not None:
                    os.rename(old, self.target)
                raise
        fsync_dir(self.target.parent)
        if old is not None:
            remove_replaced(old)
