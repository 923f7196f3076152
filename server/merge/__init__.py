"""MergeAdapter's engine-independent core: LoRA adapters into full weights (streamed) or into a new adapter.

The gRPC handler and ``adapterd merge`` call :class:`Merger`; see ``merger.py``. The names below are imported
on first use (PEP 562), so that ``adapterd merge --help`` (``merge/cli.py``) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"Merger": ".merger", "MergeResult": ".merger", "STRATEGIES": ".strategies",
          "strategy_name_from_proto": ".strategies"}

__all__ = ["STRATEGIES", "MergeResult", "Merger", "strategy_name_from_proto"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
