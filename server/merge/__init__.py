"""MergeAdapter's engine-independent core: LoRA adapters into full weights (streamed) or into a new adapter.

The gRPC handler and ``adapterd merge`` call :class:`Merger`; see ``merger.py``.
"""

from .merger import Merger, MergeResult
from .strategies import STRATEGIES, strategy_name_from_proto

__all__ = ["STRATEGIES", "MergeResult", "Merger", "strategy_name_from_proto"]
