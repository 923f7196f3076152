"""PEFT's ``rank_pattern`` / ``alpha_pattern`` key matching, in linear time.

PEFT picks the pattern key for a module with ``re.match(rf"(.*\\.)?({key})$", module)`` over the keys in order
(``peft.utils.other.get_pattern_key``). Python's ``re`` backtracks: a key such as ``(.|.)*(.|.)*(.|.)*Z`` takes
exponential time on a module name and holds the GIL meanwhile, which froze every RPC of the daemon. The
same expression is compiled here with RE2 (``google-re2``), whose matching time is linear in the name's
length, so the semantics stay PEFT's and no key can stall the process. A key RE2 cannot compile (back
references, look-arounds) or one that needs more than ``MAX_PATTERN_MEMORY`` bytes to compile is refused.

Differences from Python's ``re`` that cannot matter for module names: ``$`` does not also match before a
trailing newline (names hold none), and ``\\w``/``\\d`` are ASCII (names are ASCII identifiers and digits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import re2

from ..errors import FailedPrecondition

MAX_PATTERN_CHARS = 1024  # a pattern key names modules: longer ones are refused before compiling
MAX_PATTERN_MEMORY = 1 << 20  # bytes RE2 may use to compile one key (its default is 8 MiB)


@lru_cache(maxsize=1024)
def _compiled(key: str) -> Any:
    """The key as PEFT wraps it, compiled by RE2 (cached: the same keys recur on every load)."""
    options = re2.Options()
    options.log_errors = False  # a bad key is the caller's error, reported once, not logged by RE2 too
    options.max_mem = MAX_PATTERN_MEMORY
    return re2.compile(rf"(.*\.)?({key})$", options)


def _checked(key: Any, field: str) -> Any:
    if not isinstance(key, str):
        raise FailedPrecondition(f"{field}: key {key!r} is not a string")
    if len(key) > MAX_PATTERN_CHARS:
        raise FailedPrecondition(f"{field}: a key of {len(key)} characters is longer than the "
                                 f"{MAX_PATTERN_CHARS} allowed")
    try:
        return _compiled(key)
    except (re2.error, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{field}: key {key[:80]!r} is not a pattern this daemon matches "
                                 f"({exc}); use a plain regular expression without back references or "
                                 "look-arounds") from None


def pattern_key(keys: Iterable[Any], module: str, field: str = "pattern") -> str:
    """The first key whose pattern matches ``module``, or ``module`` itself when none does (PEFT's
    ``get_pattern_key``). ``field`` names the config entry in errors (``alpha_pattern``)."""
    for key in keys:
        if _checked(key, field).match(module):
            return key
    return module


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any, field: str = "pattern") -> Any:
    """``patterns[key]`` for the key that matches ``module``, else ``default`` (as PEFT resolves
    ``rank_pattern`` and ``alpha_pattern``)."""
    if not patterns:
        return default
    if not isinstance(patterns, Mapping):
        raise FailedPrecondition(f"{field} must be an object mapping patterns to values")
    return patterns.get(pattern_key(list(patterns), module, field), default)
