"""Merge LoRA adapters into a base model's full weights, streaming one tensor at a time.

The base is read from its original safetensors files in their own dtype (never the quantized copy the
server holds in memory). For each base tensor that some adapter targets, ``W += sum_i w_i * s_i * B_i @ A_i``
is computed in fp32 (fp64 stays fp64) one block of rows at a time and cast back to the stored dtype; every
other tensor is copied byte for byte. Output shards are written as they go (see ``safetensors_io``), so peak memory
is the adapters' own tensors plus a few blocks of ``chunk_bytes`` (16 MB by default), whatever the size of
the model or of its largest tensor.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.peft_format import LoraModule
from ..errors import DataLoss, FailedPrecondition
from ..safetensors_io import (
    COPY_CHUNK_BYTES,
    ShardPlan,
    ShardWriter,
    TensorEntry,
    model_weight_files,
    plan_shards,
    read_header,
    read_rows,
    write_index,
)
from .lora import LoraAdapter

# (tensors_done, tensors_total, bytes_written). It may raise to cancel the merge; the output is then removed.
ProgressFn = Callable[[int, int, int], None]

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3  # file layout only: the streaming writer does not hold a shard in RAM
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
PROVENANCE_FILE = "adapterd_merge.json"


@dataclass(frozen=True)
class Target:
    """One adapter's module to add to a base weight: its factors, the adapter's weight in the sum, and
    whether the base stores that weight ``(in, out)`` (GPT-2's Conv1D: PEFT's ``fan_in_fan_out``)."""

    module: LoraModule
    weight: float
    fan_in_fan_out: bool

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this delta is added to."""
        out_f, in_f = int(self.module.b.shape[0]), int(self.module.a.shape[1])
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def add_to(self, rows: torch.Tensor, first_row: int = 0) -> None:
        """``rows += weight * delta[first_row : first_row + len(rows)]`` in place (delta transposed for
        fan_in_fan_out: ``(B @ A).T = A.T @ B.T``, as PEFT's ``get_delta_weight``).

        Fused (``addmm_``), so no (out, in) temporary is made; ``rows`` is a block of the base weight as
        stored (fp32 or fp64; the factors are cast to its dtype)."""
        a, b = self.module.a.to(rows.dtype), self.module.b.to(rows.dtype)
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)
        rows.addmm_(left[first_row: first_row + rows.shape[0]], right, alpha=self.weight * self.module.scaling)


@dataclass(frozen=True)
class ModelMergeStats:
    tensors_total: int
    tensors_merged: int  # base tensors that an adapter changed
    bytes_written: int  # all files of the output directory, bytes
    shards: int


def base_entries(base_dir: Path) -> list[TensorEntry]:
    """Every tensor of the base checkpoint, in file order; DataLoss on duplicates across shards."""
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    for path in model_weight_files(base_dir):
        for e in read_header(path):
            if e.name in seen:
                raise DataLoss(f"{e.name} appears in two shards of {base_dir}")
            seen.add(e.name)
            entries.append(e)
    return entries


def _base_key(module: str, names: set[str]) -> str | None:
    """The checkpoint key of a module's weight. PEFT names modules as the model does; checkpoints of some
    models drop or add the ``model.`` prefix, so both spellings are tried."""
    for candidate in (module, module.removeprefix("model."), f"model.{module}"):
        if f"{candidate}.weight" in names:
            return f"{candidate}.weight"
    return None


def map_targets(adapters: list[tuple[LoraAdapter, float]], entries: list[TensorEntry]) -> dict[str, list[Target]]:
    """Base tensor name -> the (module, weight) pairs to add to it; FailedPrecondition (naming the adapter's
    field) when an adapter targets a module the base lacks or has another shape: made for another base."""
    by_name = {e.name: e for e in entries}
    names = set(by_name)
    targets: dict[str, list[Target]] = {}
    for i, (adapter, weight) in enumerate(adapters):
        field = f"adapters[{i}].adapter_id"
        for name, module in adapter.modules.items():
            key = _base_key(name, names)
            if key is None:
                raise FailedPrecondition(f"adapter {adapter.adapter_id!r} targets {name}, which the base "
                                         "has no weight for (made for another base model?)", field=field)
            target = Target(module, weight, adapter.config.fan_in_fan_out)
            if by_name[key].shape != target.weight_shape:
                raise FailedPrecondition(
                    f"adapter {adapter.adapter_id!r}: {name} expects a weight of shape "
                    f"{target.weight_shape}, the base has {by_name[key].shape} (made for another base?)",
                    field=field)
            targets.setdefault(key, []).append(target)
    return targets


def merged_blocks(entry: TensorEntry, targets: list[Target], block_bytes: int) -> Iterator[torch.Tensor]:
    """One base tensor with the weighted deltas added, as blocks of rows of about ``block_bytes`` in fp32.

    Each block is read, widened to fp32 (fp64 stays fp64), added to with ``addmm_`` and narrowed back to the
    stored dtype, so memory is a few blocks however large the tensor (an 8192 x 28672 MLP weight included).
    """
    rows = entry.shape[0]
    step = max(1, block_bytes // max(1, 4 * math.prod(entry.shape[1:])))
    for first in range(0, rows, step):
        stored = read_rows(entry, first, min(step, rows - first))
        acc = stored if stored.dtype in (torch.float32, torch.float64) else stored.to(torch.float32)
        dtype = stored.dtype
        del stored  # for bf16/fp16 bases the fp32 block is now the only copy
        for target in targets:
            target.add_to(acc, first)
        block = acc.to(dtype)
        del acc
        yield block
        del block  # before the next read: one block in flight at a time


class _Counter:
    """Counts tensors done and bytes written, and reports each finished tensor to ``progress``."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total, self.progress = total, progress
        self.done = 0
        self.bytes = 0

    def start(self) -> None:
        if self.progress is not None:
            self.progress(0, self.total, 0)

    def tensor_done(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, self.bytes)


def _write_shard(out_dir: Path, plan: ShardPlan, targets: dict[str, list[Target]], counter: _Counter,
                 chunk_bytes: int) -> None:
    """Write one shard: its header, then each tensor merged (if targeted) or copied byte for byte."""
    writer = ShardWriter(out_dir / plan.filename, plan)
    counter.bytes += writer.bytes_written  # the header
    try:
        for entry in plan.entries:
            if entry.name in targets:
                blocks = merged_blocks(entry, targets[entry.name], chunk_bytes)
                counter.tensor_done(writer.write_blocks(entry, blocks))
            else:
                counter.tensor_done(writer.copy_entry(entry, chunk_bytes))
    except BaseException:
        writer.abort()
        raise
    writer.close()


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Copy config, generation config, tokenizer and any other non-weight top-level files: their contents
    only, so that the copies follow the umask rather than the base's modes (often read-only or private)."""
    for path in sorted(base_dir.iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        if path.name == PROVENANCE_FILE:
            continue
        shutil.copyfile(path, out_dir / path.name)


def write_provenance(out_dir: Path, base_dir: Path, adapters: list[tuple[LoraAdapter, float]]) -> None:
    """A small JSON note of what was merged into what, for whoever finds the directory later."""
    note = {
        "merged_by": "adapterd",
        "base_model_dir": str(base_dir),
        "adapters": [{"adapter_id": a.adapter_id, "weight": w, "path": str(a.path)} for a, w in adapters],
        "created_unix_s": int(time.time()),
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(note, indent=2) + "\n")


def merge_into_model(base_dir: Path, adapters: list[tuple[LoraAdapter, float]], out_dir: Path, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: ProgressFn | None = None,
                     chunk_bytes: int = COPY_CHUNK_BYTES) -> ModelMergeStats:
    """Write the merged model into ``out_dir`` (an existing empty directory; the caller publishes it).

    ``progress(tensors_done, tensors_total, bytes_written)`` is called once before the first tensor and
    after each one; an exception it raises aborts the merge.
    """
    entries = base_entries(base_dir)
    targets = map_targets(adapters, entries)
    plans = plan_shards(entries, max_shard_bytes)
    counter = _Counter(len(entries), progress)
    counter.start()
    for plan in plans:
        _write_shard(out_dir, plan, targets, counter, chunk_bytes)
    write_index(out_dir, plans)
    copy_side_files(base_dir, out_dir)
    write_provenance(out_dir, base_dir, adapters)
    written = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return ModelMergeStats(len(entries), len(targets), written, len(plans))
