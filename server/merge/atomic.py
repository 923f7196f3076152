"""Where a merge may write: the output policy around ``common.fsutil.AtomicDir`` (which builds the output
under a hidden temporary name beside the target, seals it and renames it; see there).

A merge refuses an existing output unless asked to overwrite it, and even then replaces only what looks
like a previous output; its refusals are gRPC errors that never name the server's path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ...common.fsutil import AtomicDir
from ..errors import AlreadyExists, FailedPrecondition


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


def merge_output(target: Path, *, overwrite: bool, marker: str, field: str) -> AtomicDir:
    """``with merge_output(...) as tmp:`` write the merge into ``tmp``; a clean exit publishes it as
    ``target`` (checked by ``check_target`` before and again at the rename)."""
    check = functools.partial(check_target, overwrite=overwrite, marker=marker, field=field)
    return AtomicDir(target, replace=overwrite, check=check)
