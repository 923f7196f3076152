"""The adapter root: discovery, loading and validation against the base, and states for ListAdapters.

Loading reads ``adapter_config.json`` and ``adapter_model.safetensors`` through ``peft_format`` (the one
reader of the format; never pickle), checks the adapter against the base, and keeps its tensors on the
host, ready to be copied into a device slot by the engine.
Each adapter type registers a loader in ``ADAPTER_KINDS``; nothing else branches on the type.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterdError, DataLoss, FailedPrecondition, ResourceExhausted
from ..pinned import DEFAULT_MAX_BYTES, HostBufferPool
from .files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_bytes_cap,
    adapter_file,
    listed_text,
    read_chat_template,
    read_config,
)
from .ids import discover_adapter_ids, resolve_adapter_dir
from .lora_weights import LoraWeights, parse_lora
from .peft_format import (
    ConfigDescription,
    LoraConfig,
    PrefixConfig,
    describe_config,
    read_adapter,
)
from .prefix import PrefixWeights, parse_prefix

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 1000  # characters of a listed load error

# States, as the proto's AdapterState names them.
ON_DISK, LOADING, RESIDENT_GPU, RESIDENT_CPU, LOAD_FAILED = (
    "ON_DISK", "LOADING", "RESIDENT_GPU", "RESIDENT_CPU", "LOAD_FAILED")


@dataclass
class BaseShape:
    """What the store checks adapters against, read once from the base at start-up."""

    linear_shapes: dict[str, tuple[int, int]]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_lora_rank: int


@dataclass
class LoadedAdapter:
    adapter_id: str
    type: str  # "LORA" or "PREFIX_TUNING"
    key: str  # unique per load, so a reloaded adapter never reuses a stale device slot
    size_bytes: int
    lora: LoraWeights | None = None
    prefix: PrefixWeights | None = None
    chat_template: str | None = None  # the Jinja template it was trained with (files.read_chat_template)

    @property
    def rank(self) -> int:
        return self.lora.rank if self.lora else 0

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix else 0

    @property
    def target_modules(self) -> list[str]:
        return self.lora.target_modules if self.lora else []

    @property
    def memory_bytes(self) -> int:
        """Bytes its tensors take where the store keeps them (host for LoRA, device for prefixes)."""
        if self.lora:
            return sum(m.a.nbytes + m.b.nbytes for m in self.lora.modules.values())
        return sum(t.nbytes for t in self.prefix.keys + self.prefix.values) if self.prefix else 0


@dataclass
class AdapterRecord:
    """One row of ListAdapters."""

    adapter_id: str
    type: str = ""
    rank: int = 0
    num_virtual_tokens: int = 0
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    state: str = ON_DISK
    last_used: float = 0.0
    error: str = ""
    base_model: str = ""


# The store's host buffer pool, for the loader running in this thread (set by ``AdapterStore._read``), so that
# loaders keep their three-argument signature.
_host_pool: ContextVar[HostBufferPool | None] = ContextVar("adapterd_host_pool", default=None)


def pack_host(tensors: list[torch.Tensor], dtype: torch.dtype, pin: bool,
              pool: HostBufferPool | None = None) -> list[torch.Tensor]:
    """Copies of ``tensors`` in ``dtype``, as views into one host buffer: one allocation (and, with
    ``pin``, one page-locked allocation, which costs far more than a copy) per adapter instead of one per
    tensor. Pinned memory lets the copies into device slots run asynchronously. With ``pool`` the buffer is
    lent by the pool (``pin`` ignored) and returns to it when the views are gone."""
    total = sum(t.numel() for t in tensors)
    if pool is not None:
        buffer = pool.take(total * dtype.itemsize).view(dtype)
    else:
        buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    views, at = [], 0
    for t in tensors:
        view = buffer[at:at + t.numel()].view(t.shape)
        view.copy_(t)
        views.append(view)
        at += t.numel()
    return views


def _load_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseShape) -> dict[str, Any]:
    weights = parse_lora(LoraConfig.from_dict(config), tensors, base.linear_shapes, base.max_lora_rank, base.dtype)
    modules = list(weights.modules.values())
    if any(t.dtype != base.dtype for m in modules for t in (m.a, m.b)):  # else: already one pinned buffer
        packed = pack_host([t for m in modules for t in (m.a, m.b)], base.dtype, pin=base.device.type == "cuda",
                           pool=_host_pool.get())
        for i, m in enumerate(modules):
            m.a, m.b = packed[2 * i], packed[2 * i + 1]
    return {"lora": weights}


def _load_prefix(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseShape) -> dict[str, Any]:
    weights = parse_prefix(PrefixConfig.from_dict(config), tensors, base.num_layers, base.num_kv_heads,
                           base.head_dim)
    return {"prefix": weights.to(base.device, base.dtype)}


# peft_type -> loader. A new adapter type is one entry here and one module beside this one.
ADAPTER_KINDS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor], BaseShape], dict[str, Any]]] = {
    "LORA": _load_lora,
    "PREFIX_TUNING": _load_prefix,
}


class AdapterStore:
    """Adapters under one root directory. Thread-safe: loads run in worker threads, off the event loop.

    ``is_on_device`` is set by the engine so that ListAdapters can tell a device-resident adapter from one
    held only on the host.

    Files are read into buffers lent by ``host_pool`` (page-locked on a CUDA base, pageable on a CPU one). A
    loaded LoRA adapter keeps its host weights as views into that buffer until it is unloaded (slot fills copy
    from them), so the buffer returns to the pool only then: the pool must hold the loaded set to serve every
    load from reused memory. ``host_pool_bytes`` caps it (bytes, lent and free); the default is
    ``pinned.DEFAULT_MAX_BYTES``, or twice ``max_loaded_bytes`` when that is larger (page-locked buffers are
    rounded up to a power of two, so a budget of tensor bytes may take up to twice as many locked bytes).
    Loads past the cap read into private pageable buffers.
    """

    def __init__(self, root: Path, base: BaseShape, max_loaded_bytes: int | None = None,
                 host_pool_bytes: int | None = None, max_adapter_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.base = base
        # Tensor bytes one adapter file may declare; larger files are refused from their header, unread.
        self.max_adapter_bytes = max_adapter_bytes or adapter_bytes_cap(base.linear_shapes, base.max_lora_rank)
        # Loaded adapters beyond this many bytes are unloaded, least recently used first (they load again
        # from disk on their next request); None: no limit. A budget in bytes, not a count: rank 64 costs
        # eight times rank 8.
        self.max_loaded_bytes = max_loaded_bytes
        if host_pool_bytes is None:
            host_pool_bytes = max(DEFAULT_MAX_BYTES, 2 * (max_loaded_bytes or 0))
        pin = base.device.type == "cuda"
        self.host_pool = HostBufferPool(host_pool_bytes, pin=pin, device=base.device if pin else None)
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedAdapter] = {}
        self._loading: dict[str, threading.Event] = {}
        self._failed: dict[str, str] = {}
        # ListAdapters' descriptions of adapters not loaded: id -> (the config's stat key, description).
        self._described: dict[str, tuple[tuple[int, int, int], ConfigDescription]] = {}
        self._last_used: dict[str, float] = {}
        self._generation = 0
        self.is_on_device: Callable[[LoadedAdapter], bool] = lambda adapter: False
        self.on_unload: Callable[[LoadedAdapter], None] = lambda adapter: None
        # Called after each load attempt: (adapter_id, seconds it took, the adapter or the error). Metrics.
        self.on_load: Callable[[str, float, LoadedAdapter | BaseException], None] = lambda *attempt: None

    def resolve(self, adapter_id: str, field: str = "adapter_id") -> Path:
        return resolve_adapter_dir(self.root, adapter_id, field)

    def loaded_now(self, adapter_id: str) -> LoadedAdapter | None:
        """The adapter if it is loaded now, else None; never blocks on the disk."""
        with self._lock:
            loaded = self._loaded.get(adapter_id)
        if loaded is not None:
            self.touch(adapter_id)
        return loaded

    def get(self, adapter_id: str, field: str = "adapter_id") -> LoadedAdapter:
        """The loaded adapter, loading it first if needed (blocking: call from a worker thread)."""
        with self._lock:
            loaded = self._loaded.get(adapter_id)
        if loaded is not None:
            self.touch(adapter_id)
            return loaded
        return self.load(adapter_id, field)

    def load(self, adapter_id: str, field: str = "adapter_id") -> LoadedAdapter:
        path = self.resolve(adapter_id, field)
        while True:
            with self._lock:
                if adapter_id in self._loaded:
                    return self._loaded[adapter_id]
                waiting = self._loading.get(adapter_id)
                if waiting is None:
                    done = self._loading[adapter_id] = threading.Event()
                    break
            waiting.wait()  # another thread is loading it; then look again
        started = time.monotonic()
        try:
            adapter = self._read(adapter_id, path)
        except torch.OutOfMemoryError as exc:
            # Not the adapter's fault, so not LOAD_FAILED: the same load may succeed once memory frees.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            oom = ResourceExhausted(f"out of memory while loading adapter {adapter_id!r}; retry later")
            self.on_load(adapter_id, time.monotonic() - started, oom)
            raise oom from exc
        except AdapterdError as exc:
            with self._lock:
                self._failed[adapter_id] = str(exc)
            self.on_load(adapter_id, time.monotonic() - started, exc)
            raise
        finally:
            with self._lock:
                del self._loading[adapter_id]
            done.set()
        with self._lock:
            self._loaded[adapter_id] = adapter
            self._failed.pop(adapter_id, None)
        self.on_load(adapter_id, time.monotonic() - started, adapter)
        self.touch(adapter_id)
        self._keep_within_budget(adapter_id)
        return adapter

    def _keep_within_budget(self, keep: str) -> None:
        """Unload least recently used adapters (never ``keep``) until the loaded ones fit the budget. A row
        still running with an unloaded adapter keeps its own reference and finishes normally."""
        if self.max_loaded_bytes is None:
            return
        while True:
            with self._lock:
                total = sum(a.memory_bytes for a in self._loaded.values())
                others = [i for i in self._loaded if i != keep]
                if total <= self.max_loaded_bytes or not others:
                    return
                oldest = min(others, key=lambda i: self._last_used.get(i, 0.0))
                adapter = self._loaded.pop(oldest)
            self.on_unload(adapter)

    def unload(self, adapter_id: str, field: str = "adapter_id") -> AdapterRecord:
        with self._lock:
            adapter = self._loaded.pop(adapter_id, None)
        if adapter is None:
            self.resolve(adapter_id, field)  # NOT_FOUND for an unknown id, else: was not loaded
        else:
            self.on_unload(adapter)
        return self.record(adapter_id)

    def touch(self, adapter_id: str) -> None:
        self._last_used[adapter_id] = time.time()

    def loaded(self) -> list[LoadedAdapter]:
        with self._lock:
            return list(self._loaded.values())

    def record(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            adapter = self._loaded.get(adapter_id)
            loading = adapter_id in self._loading
            error = self._failed.get(adapter_id, "")
        rec = AdapterRecord(adapter_id=adapter_id, last_used=self._last_used.get(adapter_id, 0.0))
        path = self.root / adapter_id
        rec.size_bytes = self._files_size(path)
        if adapter is not None:
            rec.type, rec.rank, rec.num_virtual_tokens = adapter.type, adapter.rank, adapter.num_virtual_tokens
            rec.target_modules = adapter.target_modules
            on_gpu = self.is_on_device(adapter) and self.base.device.type == "cuda"
            rec.state = RESIDENT_GPU if on_gpu or (adapter.prefix and self.base.device.type == "cuda") \
                else RESIDENT_CPU
            return rec
        described = self._describe(adapter_id, path)
        rec.type, rec.base_model, rec.rank = described.type, described.base_model, described.rank
        rec.num_virtual_tokens, rec.target_modules = described.num_virtual_tokens, described.target_modules
        error = error or described.error
        rec.state = LOADING if loading else (LOAD_FAILED if error else ON_DISK)
        rec.error = listed_text(error, MAX_ERROR_TEXT)
        return rec

    def list(self) -> list[AdapterRecord]:
        """Every adapter under the root. Blocking (it reads the directory tree): call it from a worker thread.
        Each entry stands alone: one that cannot be described is listed as LOAD_FAILED with its reason."""
        ids = discover_adapter_ids(self.root)
        records = [self._record_or_failure(i) for i in ids]
        with self._lock:  # forget descriptions of adapters that are gone
            for gone in set(self._described) - set(ids):
                del self._described[gone]
        return records

    def _record_or_failure(self, adapter_id: str) -> AdapterRecord:
        try:
            return self.record(adapter_id)
        except AdapterdError as exc:
            reason = str(exc)
        except Exception:  # noqa: BLE001 - one odd entry must not fail the listing for every caller
            log.warning("adapter %s: cannot be described", adapter_id, exc_info=True)
            reason = "cannot be described (see the daemon's log)"
        return AdapterRecord(adapter_id=adapter_id, state=LOAD_FAILED, error=listed_text(reason, MAX_ERROR_TEXT))

    def _files_size(self, path: Path) -> int:
        """Bytes of the adapter directory's regular files that lie inside the root (a symlink leading out
        is not followed into another tree's sizes)."""
        total = 0
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        try:
                            adapter_file(self.root, path, entry.name)
                        except AdapterdError:
                            continue
                    if entry.is_file():
                        total += entry.stat().st_size
        except OSError:
            return total
        return total

    def _describe(self, adapter_id: str, path: Path) -> ConfigDescription:
        """What the config says (type, rank, ...), cached by the config's modification time, size and inode,
        so that listing 2,000 adapters does not read 2,000 configs each time (about 0.1 s a listing then, on
        a 2-core CPU). ``path`` is a directory inside the root (discovered there, or resolved by id), so only
        a config that is a symlink needs its real path checked."""
        try:
            config_path = path / CONFIG_FILE
            if os.path.islink(config_path):  # only a link can lead out of a directory already inside the root
                config_path = adapter_file(self.root, path, CONFIG_FILE)
            st = os.stat(config_path)
        except AdapterdError as exc:
            return ConfigDescription(error=str(exc))
        except OSError as exc:
            return ConfigDescription(error=f"{CONFIG_FILE} is unreadable ({exc.strerror})")
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._described.get(adapter_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            described = describe_config(read_config(config_path))
        except AdapterdError as exc:
            described = ConfigDescription(error=str(exc))
        with self._lock:
            self._described[adapter_id] = (key, described)
        return described

    def _read(self, adapter_id: str, path: Path) -> LoadedAdapter:
        files = read_adapter(self.root, path, pool=self.host_pool, max_bytes=self.max_adapter_bytes)
        config, tensors, peft_type = files.raw, files.tensors, files.peft_type
        loader = ADAPTER_KINDS.get(peft_type)
        if loader is None:
            raise FailedPrecondition(f"adapter type {peft_type!r} is not served (served: "
                                     f"{', '.join(ADAPTER_KINDS)})")
        token = _host_pool.set(self.host_pool)
        try:
            parts = loader(config, tensors, self.base)
        except (AdapterdError, torch.OutOfMemoryError):
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RuntimeError) as exc:
            # A field of the wrong type or tensors of the wrong kind: the files are damaged, whatever the
            # parser tripped on. Without this, a bad config would surface as INTERNAL with a stack trace.
            log.warning("adapter %s: malformed files", adapter_id, exc_info=True)
            raise DataLoss(f"{CONFIG_FILE} and {WEIGHTS_FILE} do not make a valid {peft_type} adapter: "
                           f"{type(exc).__name__}: {exc}") from exc
        finally:
            _host_pool.reset(token)
        with self._lock:
            self._generation += 1
            key = f"{adapter_id}#{self._generation}"
        return LoadedAdapter(adapter_id=adapter_id, type=peft_type, key=key, size_bytes=self._files_size(path),
                             chat_template=read_chat_template(self.root, path), **parts)

