"""Adapter ids: paths under the adapter root, validated and confined to it.

An id is one or more path segments of letters, digits, ``_``, ``-`` and ``.`` joined by ``/``
(``support/v2``). No segment may be ``.`` or ``..`` or start with a dot (dot-names are hidden: temporary
directories of merges and exports live there), and the resolved directory, symlinks followed, must lie
inside the root: an id can never reach a file outside it. The serving core, the merger and the training
manager all resolve ids here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidArgument, NotFound

_SEGMENT = re.compile(r"[A-Za-z0-9_\-.]+")
MAX_ID_LENGTH = 256
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def validate_adapter_id(adapter_id: str, field: str = "adapter_id") -> str:
    """Return the id unchanged if it is well-formed, else raise InvalidArgument naming ``field``."""
    if not adapter_id:
        raise InvalidArgument("must not be empty", field=field)
    if len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidArgument(f"longer than {MAX_ID_LENGTH} characters", field=field)
    for segment in adapter_id.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment.startswith("."):
            raise InvalidArgument(
                f"{adapter_id!r} is not a valid adapter id: use path segments of letters, digits, "
                "'_', '-' and '.', joined by '/', none of them starting with '.'", field=field)
    return adapter_id


def resolve_adapter_dir(root: str | os.PathLike, adapter_id: str, field: str = "adapter_id", *,
                        must_exist: bool = True) -> Path:
    """The adapter's directory under ``root``: validated, symlinks resolved, confined to the root.

    Raises InvalidArgument for a malformed id or one that escapes the root, and NotFound when
    ``must_exist`` and no adapter (a directory with ``adapter_config.json``) is there. With
    ``must_exist=False`` (an output id) the directory may be absent.
    """
    validate_adapter_id(adapter_id, field)
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root / adapter_id))
    if real_root not in target.parents:
        raise InvalidArgument(f"adapter id {adapter_id!r} resolves outside the adapter root", field=field)
    # lexists, not is_file: a config that is a FIFO or a dangling link is an adapter with a broken file (the
    # reader says which), not a missing adapter.
    if must_exist and not os.path.lexists(target / CONFIG_FILE):
        raise NotFound(f"no adapter {adapter_id!r} under the adapter root", field=field)
    return target


def _is_valid_id(adapter_id: str) -> bool:
    try:
        validate_adapter_id(adapter_id)
    except InvalidArgument:
        return False
    return True


def discover_adapter_ids(root: Path) -> list[str]:
    """Every adapter id under ``root``: directories holding ``adapter_config.json``, symlinks that stay
    inside the root included, sorted. Directories whose path is not a valid id (other characters, which
    could not be requested and may not even be valid UTF-8) are left out."""
    real_root = os.path.realpath(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, real_root)  # strings, not Paths: thousands of adapters are listed often
        if CONFIG_FILE in filenames and rel != "." and _is_valid_id(rel):
            found.append(rel)
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                try:
                    resolve_adapter_dir(real_root, f"{rel}/{d}" if rel != "." else d)
                    found.append(f"{rel}/{d}" if rel != "." else d)
                except (InvalidArgument, NotFound):
                    pass
    return sorted(found)
