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
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import DataLoss, FailedPrecondition
from .pinned import HostBufferPool

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces (a base model's shards)
ADAPTER_MAX_HEADER_BYTES = 4 * 1024 * 1024  # an adapter's header: ~150 bytes a tensor, thousands of tensors
COPY_CHUNK_BYTES = 16 * 1024 * 1024  # bytes per read/write when copying an untouched tensor

# Bytes per element: to check each tensor's byte count against its shape, and to order tensors inside a shard
# so that each stays aligned to its item size.
ITEM_BYTES: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
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


def open_regular(path: Path, label: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (symlinks followed).

    A FIFO, socket or device would block a read forever or stream without end: each is refused with
    FailedPrecondition naming ``label`` (a file name, never a server path), checked on the path first, so
    that nothing else is opened at all, then on the descriptor (opened non-blocking, so opening cannot hang
    either), in case the path changed in between. Raises FileNotFoundError when there is no such file.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise FailedPrecondition(f"{label} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FailedPrecondition(f"{label} is not a regular file")
    return fd


def read_at(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` with positioned reads; returns the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _entry(name: Any, info: Any, data_start: int, path: Path) -> TensorEntry:
    """One header entry, checked: a known layout, integers where integers belong, bytes matching the shape."""
    label = path.name
    if not isinstance(name, str) or not isinstance(info, dict):
        raise DataLoss(f"{label}: corrupt safetensors header (entry {str(name)[:80]!r})")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(_is_count(v) for v in (*shape, *offsets))):
        raise DataLoss(f"{label}: tensor {name[:80]!r} has a corrupt header entry")
    begin, end = offsets
    if begin > end or (dtype in ITEM_BYTES and math.prod(shape) * ITEM_BYTES[dtype] != end - begin):
        raise DataLoss(f"{label}: tensor {name[:80]!r} has {end - begin} bytes for {dtype} shape {shape}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _parse_header(fd: int, path: Path, max_header_bytes: int) -> list[TensorEntry]:
    """The header's entries, in file order, checked against each other and the file's size before any tensor
    byte is read: contiguous from the start of the data, ending exactly at the end of the file (as
    safetensors requires), so that no declared shape can make a reader take more than the file holds."""
    label, size = path.name, os.fstat(fd).st_size
    raw_len = os.pread(fd, 8, 0)
    if len(raw_len) != 8:
        raise DataLoss(f"{label}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > max_header_bytes:
        raise FailedPrecondition(f"{label}: a safetensors header of {header_len} bytes is larger than the "
                                 f"{max_header_bytes} allowed")
    if 8 + header_len > size:
        raise DataLoss(f"{label}: corrupt safetensors header length {header_len} (truncated file?)")
    buf = bytearray(header_len)
    if read_at(fd, memoryview(buf), 8) != header_len:
        raise DataLoss(f"{label}: truncated safetensors header")
    try:
        header = json.loads(buf)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataLoss(f"{label}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise DataLoss(f"{label}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries = sorted((_entry(n, i, data_start, path) for n, i in header.items() if n != "__metadata__"),
                     key=lambda e: (e.start, e.nbytes))
    at = data_start
    for e in entries:
        if e.start != at:
            raise DataLoss(f"{label}: tensor {e.name[:80]!r} overlaps another or leaves a gap")
        at += e.nbytes
    if at != size:
        raise DataLoss(f"{label}: the header describes {at} bytes but the file has {size} (truncated or damaged)")
    return entries


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> list[TensorEntry]:
    """Parse and check a safetensors header (see ``_parse_header``); DataLoss if the file is truncated or the
    header corrupt, FailedPrecondition if the file is not a regular file or its header is too large."""
    fd = open_regular(path, path.name)
    try:
        return _parse_header(fd, path, max_header_bytes)
    finally:
        os.close(fd)


def read_tensors(path: Path, pin: bool = False, pool: HostBufferPool | None = None,
                 max_data_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a small file (an adapter) as a view into one host buffer, filled by one read.

    ``safetensors.torch.load_file`` copies each tensor out of a memory map, and serving then copies them again
    into page-locked memory for fast host-to-device transfers; reading the data section straight into one
    page-locked buffer (``pin``) does both in one pass. With ``pool`` the buffer is lent by the pool (page-locked
    or not as the pool is; ``pin`` is then ignored) and returns to it when every tensor is gone: a reused buffer
    is already mapped (and locked), so the read runs at copy speed instead of paying first-touch faults or
    page-locking for every load (see ``adapterd.server.pinned``). Only floating-point tensors are accepted.

    Everything is checked from the header before a buffer is taken: a file that declares more than
    ``max_data_bytes`` of tensors is refused (FailedPrecondition) without reading them. Raises DataLoss for a
    truncated or corrupt file, FailedPrecondition for a tensor of another dtype. Messages name the file only.
    """
    fd = open_regular(path, path.name)
    try:
        entries = _parse_header(fd, path, ADAPTER_MAX_HEADER_BYTES)
        _check_adapter_entries(entries, path.name, max_data_bytes)
        if not entries:
            return {}
        first, end = entries[0].start, entries[-1].start + entries[-1].nbytes
        buffer = _read_data(fd, first, end - first, pin, pool)
        if buffer is None:
            raise DataLoss(f"{path.name}: truncated")
    finally:
        os.close(fd)
    tensors = {}
    for e in entries:
        raw = buffer[e.start - first:e.start - first + e.nbytes]
        if (e.start - first) % e.item_bytes:  # misaligned for its dtype (legal, rare): a private copy
            raw = raw.clone()
        tensors[e.name] = raw.view(FLOAT_DTYPES[e.dtype]).view(e.shape)
    return tensors


def _read_data(fd: int, offset: int, nbytes: int, pin: bool, pool: HostBufferPool | None) -> torch.Tensor | None:
    """``nbytes`` from ``offset`` into one uint8 host tensor, or None if the file ends first. A plain buffer
    is a bytearray (no numpy: the merge process never imports it, which keeps its memory measurable)."""
    if pool is None and not pin:
        raw = bytearray(nbytes)
        if read_at(fd, memoryview(raw), offset) != nbytes:
            return None
        return torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    buffer = pool.take(nbytes) if pool is not None else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    return buffer if read_at(fd, memoryview(buffer.numpy()), offset) == nbytes else None


def _check_adapter_entries(entries: list[TensorEntry], label: str, max_data_bytes: int | None) -> None:
    for e in entries:
        if e.dtype not in FLOAT_DTYPES:
            raise FailedPrecondition(f"{label}: tensor {e.name[:80]!r} is {e.dtype[:16]}; adapters hold "
                                     "floating-point weights")
    total = sum(e.nbytes for e in entries)
    if max_data_bytes is not None and total > max_data_bytes:
        raise FailedPrecondition(f"{label} declares {total} bytes of tensors; adapters for this base are "
                                 f"limited to {max_data_bytes}")


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory, in index order (sharded) or the one file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataLoss(f"model files missing: {', '.join(missing)}")
    if not files:
        raise FailedPrecondition("the base model holds no safetensors weights (only safetensors bases can be "
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
            raise DataLoss(f"{entry.path.name}: tensor {entry.name} is truncated")
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
                raise DataLoss(f"{entry.path.name}: tensor {entry.name} is truncated")
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
