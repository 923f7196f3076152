"""Safetensors I/O beyond what the library offers: read a file into one (pinned) buffer with a single read;
stream tensors row block by row block; write shards without holding them in memory.

``safetensors.save_file`` needs every tensor of a file in memory at once, so a shard of 5 GB costs 5 GB of
RAM. The format is simple enough to stream instead: an 8-byte little-endian header length, a JSON header
(dtype, shape, byte offsets per tensor) padded with spaces to a multiple of 8, then the raw bytes. A merge
never changes a tensor's dtype or shape, so every output header is known before the first byte is written;
the writer emits the header, then each tensor's bytes in header order. Peak memory is one block of rows
(merged tensors) or one copy chunk (untouched ones, copied byte for byte from the source file).

Files are read with ``pread`` into private buffers rather than through ``mmap``: mapped pages count towards
the process's resident set until unmapped, which would make a merge of a 140 GB model look like it needs
140 GB, and would make the memory bound hard to measure.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adapterd.server.errors import DataLoss, FailedPrecondition
from adapterd.server.pinned import HostBufferPool

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
COPY_CHUNK_BYTES = 16 * 1024 * 1024  # bytes per read/write when copying an untouched tensor

# Bytes per element, used only to order tensors inside a shard so that each stays aligned to its item size.
ITEM_BYTES: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
}

# Source dtypes a LoRA delta can be added to (the delta is computed in fp32 and cast back).
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes lie (absolute file offsets, bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset of the first byte in ``path``
    nbytes: int

    @property
    def item_bytes(self) -> int:
        return ITEM_BYTES.get(self.dtype, 1)


def read_header(path: Path) -> list[TensorEntry]:
    """Parse a safetensors header; raises DataLoss if the file is truncated or the header is corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise DataLoss(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise DataLoss(f"{path}: corrupt safetensors header length {header_len}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataLoss(f"{path}: corrupt safetensors header ({exc})") from exc
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end or data_start + end > size:
            raise DataLoss(f"{path}: tensor {name} lies outside the file (truncated download?)")
        entries.append(TensorEntry(name, info["dtype"], tuple(info["shape"]), path, data_start + begin,
                                   end - begin))
    return sorted(entries, key=lambda e: e.start)


def read_tensors(path: Path, pin: bool = False, pool: HostBufferPool | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a small file (an adapter) as a view into one host buffer, filled by one read.

    ``safetensors.torch.load_file`` copies each tensor out of a memory map, and serving then copies them again
    into page-locked memory for fast host-to-device transfers; reading the data section straight into one
    page-locked buffer (``pin``) does both in one pass. With ``pool`` the buffer is lent by the pool (page-locked
    or not as the pool is; ``pin`` is then ignored) and returns to it when every tensor is gone: a reused buffer
    is already mapped (and locked), so the read runs at copy speed instead of paying first-touch faults or
    page-locking for every load (see ``adapterd.server.pinned``). Only floating-point tensors are accepted.
    Raises DataLoss for a truncated or corrupt file, FailedPrecondition for a tensor of another dtype.
    """
    try:
        entries = read_header(path)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a header of the wrong shape
        raise DataLoss(f"{path}: corrupt safetensors header ({type(exc).__name__}: {exc})") from exc
    if not entries:
        return {}
    first, end = entries[0].start, max(e.start + e.nbytes for e in entries)
    if pool is not None:
        buffer = pool.take(end - first)
    else:
        buffer = torch.empty(end - first, dtype=torch.uint8, pin_memory=pin)
    with open(path, "rb") as f:
        f.seek(first)
        if f.readinto(buffer.numpy()) != buffer.numel():
            raise DataLoss(f"{path}: truncated")
    tensors = {}
    for e in entries:
        dtype = FLOAT_DTYPES.get(e.dtype)
        if dtype is None:
            raise FailedPrecondition(f"{path}: tensor {e.name} is {e.dtype}; adapters hold floating-point weights")
        if math.prod(e.shape) * e.item_bytes != e.nbytes:
            raise DataLoss(f"{path}: tensor {e.name} has {e.nbytes} bytes for shape {list(e.shape)}")
        raw = buffer[e.start - first:e.start - first + e.nbytes]
        if (e.start - first) % e.item_bytes:  # misaligned for its dtype (legal, rare): a private copy
            raw = raw.clone()
        tensors[e.name] = raw.view(dtype).view(e.shape)
    return tensors


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory, in index order (sharded) or the one file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataLoss(f"model files missing: {', '.join(missing)}")
    if not files:
        raise FailedPrecondition(f"{model_dir} holds no safetensors weights (only safetensors bases can be "
                                 "merged; convert .bin checkpoints first)")
    return files


def read_rows(entry: TensorEntry, first: int, count: int) -> torch.Tensor:
    """Rows ``first`` .. ``first + count`` of a floating-point tensor, read into a fresh CPU buffer.

    Row-major storage makes a run of rows one contiguous byte range, so a large tensor can be merged one
    block of rows at a time (``count * row bytes`` of RAM) instead of whole.
    """
    dtype = FLOAT_DTYPES.get(entry.dtype)
    if dtype is None:
        raise FailedPrecondition(f"{entry.name} is stored as {entry.dtype}: a LoRA delta can only be added "
                                 "to F64/F32/F16/BF16 weights (is the base checkpoint quantized?)")
    row_bytes = entry.nbytes // entry.shape[0]
    buf = bytearray(count * row_bytes)
    with open(entry.path, "rb") as f:
        f.seek(entry.start + first * row_bytes)
        if f.readinto(buf) != len(buf):
            raise DataLoss(f"{entry.path}: tensor {entry.name} is truncated")
    if not buf:
        return torch.empty((count, *entry.shape[1:]), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(count, *entry.shape[1:])


def copy_bytes(entry: TensorEntry, out: BinaryIO, chunk_bytes: int = COPY_CHUNK_BYTES) -> None:
    """Copy an untouched tensor's bytes from its source file to ``out``, one chunk at a time."""
    remaining = entry.nbytes
    buf = bytearray(min(chunk_bytes, max(remaining, 1)))
    view = memoryview(buf)
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        while remaining:
            n = f.readinto(view[: min(len(buf), remaining)])
            if not n:
                raise DataLoss(f"{entry.path}: tensor {entry.name} is truncated")
            out.write(view[:n])
            remaining -= n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor (bf16 included)."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors it holds, in the order they are written."""

    filename: str
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def plan_shards(entries: Iterable[TensorEntry], max_shard_bytes: int) -> list[ShardPlan]:
    """Group tensors (in source order) into shards of at most ``max_shard_bytes`` of data each.

    A tensor larger than the budget gets a shard of its own. Names follow ``save_pretrained``:
    ``model.safetensors`` when one shard, else ``model-00001-of-0000N.safetensors``.
    """
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    n = len(groups)
    plans = []
    for i, group in enumerate(groups, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # Largest items first keeps every tensor aligned to its item size, as safetensors does itself.
        ordered = sorted(group, key=lambda e: (-e.item_bytes, e.name))
        plans.append(ShardPlan(name, tuple(ordered)))
    return plans


def encode_header(entries: Iterable[TensorEntry]) -> bytes:
    """The length prefix and JSON header for tensors written back to back in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one planned shard: the header at open, then each tensor's bytes in plan order.

    Callers walk ``plan.entries`` in order; ``write_tensor`` / ``write_blocks`` / ``copy_entry`` check that
    the entry is the next one and that the bytes match the plan, so a wrong-sized merged tensor can never
    produce a file that parses but is wrong.
    """

    def __init__(self, path: Path, plan: ShardPlan) -> None:
        self.path = path
        self.plan = plan
        self._pos = 0
        self._file: BinaryIO = open(path, "wb")  # closed in close()
        self.bytes_written = self._file.write(encode_header(plan.entries))

    def _expect(self, entry: TensorEntry) -> None:
        if self._pos >= len(self.plan.entries) or self.plan.entries[self._pos] != entry:
            raise RuntimeError(f"{self.path}: {entry.name} written out of plan order")

    def write_tensor(self, entry: TensorEntry, tensor: torch.Tensor) -> int:
        """Write the next planned tensor from memory; returns its size in bytes."""
        self._expect(entry)
        data = tensor_bytes(tensor)
        if data.nbytes != entry.nbytes or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"{entry.name}: merged tensor has {tuple(tensor.shape)} / {data.nbytes} bytes, "
                               f"planned {entry.shape} / {entry.nbytes}")
        self._file.write(data)
        return self._advance(entry)

    def write_blocks(self, entry: TensorEntry, blocks: Iterable[torch.Tensor]) -> int:
        """Write the next planned tensor as consecutive row blocks; returns its size in bytes."""
        self._expect(entry)
        written = 0
        for block in blocks:
            data = tensor_bytes(block)
            if written + data.nbytes > entry.nbytes:
                raise RuntimeError(f"{entry.name}: blocks exceed the planned {entry.nbytes} bytes")
            self._file.write(data)
            written += data.nbytes
            del data, block  # let the producer's next block replace this one, not join it
        if written != entry.nbytes:
            raise RuntimeError(f"{entry.name}: blocks hold {written} bytes, planned {entry.nbytes}")
        return self._advance(entry)

    def copy_entry(self, entry: TensorEntry, chunk_bytes: int = COPY_CHUNK_BYTES) -> int:
        """Copy the next planned tensor byte for byte from its source file; returns its size in bytes."""
        self._expect(entry)
        copy_bytes(entry, self._file, chunk_bytes)
        return self._advance(entry)

    def _advance(self, entry: TensorEntry) -> int:
        self._pos += 1
        self.bytes_written += entry.nbytes
        return entry.nbytes

    def close(self) -> None:
        """Flush to disk (fsync), so that the rename that publishes the directory publishes whole files."""
        if self._pos != len(self.plan.entries):
            self.abort()
            raise RuntimeError(f"{self.path}: closed after {self._pos} of {len(self.plan.entries)} tensors")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without flushing (the caller removes the half-written file with its directory)."""
        self._file.close()


def write_index(out_dir: Path, plans: list[ShardPlan]) -> None:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it (only when there are several shards)."""
    if len(plans) < 2:
        return
    weight_map = {e.name: p.filename for p in plans for e in p.entries}
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
