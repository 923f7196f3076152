"""Adapter ids: relative paths under the adapter root, checked so that none can reach outside it.

The serving core has its own resolver (``server/adapters/``); this one is kept to one function so the two
can be unified. An id is one or more path components of ``[A-Za-z0-9_.-]``, joined by ``/``; no component may
be empty, ``.``/``..`` or start with a dot (dot-names are the merger's temporary directories), and the path,
with symlinks followed, must stay inside the root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidArgument, NotFound

ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-/]+")
MAX_ID_CHARS = 256


def check_adapter_id(adapter_id: str, field: str) -> None:
    """Raise InvalidArgument (naming ``field``) unless ``adapter_id`` is a well-formed relative id."""
    if not adapter_id:
        raise InvalidArgument("adapter id is empty", field=field)
    if len(adapter_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"adapter id is longer than {MAX_ID_CHARS} characters", field=field)
    if not ID_PATTERN.fullmatch(adapter_id):
        raise InvalidArgument(f"adapter id {adapter_id!r} may only hold letters, digits, '_', '.', '-' "
                              "and '/'", field=field)
    if adapter_id.startswith("/"):
        raise InvalidArgument(f"adapter id {adapter_id!r} must be relative to the adapter root", field=field)
    for part in adapter_id.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise InvalidArgument(f"adapter id {adapter_id!r} has an empty, '.', '..' or hidden component",
                                  field=field)


def resolve_adapter_dir(root: str | os.PathLike, adapter_id: str, field: str, *,
                        must_exist: bool = True) -> Path:
    """The directory of ``adapter_id`` under ``root``, symlinks resolved.

    Raises InvalidArgument (with ``field``) for a malformed id or one that resolves outside the root, and
    NotFound when ``must_exist`` and there is no adapter (a directory with ``adapter_config.json``) there.
    With ``must_exist=False`` (an output id) the path may be absent.
    """
    check_adapter_id(adapter_id, field)
    real_root = Path(root).resolve()
    path = (real_root / adapter_id).resolve()
    if path == real_root or real_root not in path.parents:
        raise InvalidArgument(f"adapter id {adapter_id!r} resolves outside the adapter root", field=field)
    if must_exist and not (path / "adapter_config.json").is_file():
        raise NotFound(f"no adapter {adapter_id!r} (no adapter_config.json under the adapter root)",
                       field=field)
    return path
