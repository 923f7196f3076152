"""Reading a source checkpoint one tensor at a time: safetensors files (headers checked, rows read with
positioned reads, see ``safetensors_io``) or PyTorch ``.bin`` files read with ``torch.load(weights_only=True)``
only, which refuses any pickle that would run code.

A ``.bin`` file is memory-mapped (``mmap=True``) so that tensors are read from disk when used, not all at
load; the pages touched count towards the resident set while the file stays open, so a converter closes each
file once its tensors are written (``SourceCheckpoint`` keeps one ``.bin`` open at a time).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataLoss, FailedPrecondition, NotFound
from ..safetensors_io import FLOAT_DTYPES, TensorEntry, read_header, read_rows

DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


@dataclass(frozen=True)
class SourceTensor:
    """Where one source tensor lies: a safetensors entry, or a name in a ``.bin`` file."""

    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    path: Path
    entry: TensorEntry | None  # None for a .bin tensor


def read_config_json(directory: Path, missing: str, field: str = "") -> Any:
    """``directory/config.json`` parsed; NotFound saying ``missing`` when it is absent, FailedPrecondition when
    it is not JSON. ``field`` (e.g. ``"--base: "``) starts each message."""
    path = directory / "config.json"
    if not path.is_file():
        raise NotFound(f"{field}config.json is missing ({missing})")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise FailedPrecondition(f"{field}config.json is not valid JSON") from None


def weight_files(src: Path, stem: str) -> list[Path]:
    """A checkpoint's weight files named ``stem`` (``model``, ``pytorch_model``, ``adapter_model``): safetensors
    first (single or sharded through its index), else ``.bin``. Empty when there are none."""
    for suffix in (".safetensors", ".bin"):
        index = src / f"{stem}{suffix}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataLoss(f"{index.name} is not a valid weight index") from None
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise DataLoss(f"{index.name} lists {missing[0]}, which is missing")
            return [src / n for n in names]
        single = src / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        shards = sorted(src.glob(f"{stem}-*-of-*{suffix}"))
        if shards:
            return shards
    return []


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``: a pickle that names any callable other
    than tensor rebuilding is refused (FailedPrecondition naming the file), and so is anything but a flat
    mapping of names to tensors."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (pre zip) format cannot be mapped: read it whole
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FailedPrecondition(f"{path.name} was refused: it is not a plain tensor file ({_why(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataLoss(f"{path.name} could not be read as a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FailedPrecondition(f"{path.name} does not hold a mapping of names to tensors")
    return state


def _why(exc: Exception) -> str:
    """torch's reason, without its advice to load the file unsafely: the line naming what the pickle calls
    ("Trying to load unsupported GLOBAL posix.system ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or ["torch.load(weights_only=True) refused it"])[0][:300]


class SourceCheckpoint:
    """Every tensor of a checkpoint's weight files, described from headers (safetensors) or the mapped state
    dict (``.bin``), readable whole or by rows."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.tensors: dict[str, SourceTensor] = {}
        self._open_bin: tuple[Path, dict[str, torch.Tensor]] | None = None
        for path in files:
            for tensor in self._describe(path):
                if tensor.name in self.tensors:
                    raise DataLoss(f"{tensor.name} appears twice ({path.name} and "
                                   f"{self.tensors[tensor.name].path.name})")
                self.tensors[tensor.name] = tensor
        self._open_bin = None  # describing opened them; reads reopen one at a time

    def _describe(self, path: Path) -> list[SourceTensor]:
        if path.suffix == ".safetensors":
            return [SourceTensor(e.name, e.dtype, e.shape, path, e) for e in read_header(path)]
        state = load_bin(path)
        return [SourceTensor(n, DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape), path, None)
                for n, t in state.items()]

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._open_bin is None or self._open_bin[0] != path:
            self._open_bin = None  # drop the previous file's mapping first
            self._open_bin = (path, load_bin(path))
        return self._open_bin[1]

    def rows(self, name: str, first: int = 0, count: int | None = None) -> torch.Tensor:
        """Rows ``first .. first + count`` of a floating-point tensor (all of it by default), a fresh copy."""
        tensor = self.tensors[name]
        if tensor.dtype not in FLOAT_DTYPES:
            raise FailedPrecondition(f"{name} is stored as {tensor.dtype}; a floating-point tensor was expected")
        count = tensor.shape[0] - first if count is None else count
        if tensor.entry is not None:
            return read_rows(tensor.entry, first, count)
        return self._bin(tensor.path)[name][first:first + count].clone()

    def close(self) -> None:
        self._open_bin = None
