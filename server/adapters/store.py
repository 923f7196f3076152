"""The adapter root: discovery, loading and validation against the base, and states for ListAdapters.

Loading reads ``adapter_config.json`` and ``adapter_model.safetensors`` (never pickle), checks the adapter
against the base, and keeps its tensors on the host, ready to be copied into a device slot by the engine.
Each adapter type registers a loader in ``ADAPTER_KINDS``; nothing else branches on the type.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterd.server.adapters.ids import CONFIG_FILE, WEIGHTS_FILE, discover_adapter_ids, resolve_adapter_dir
from adapterd.server.adapters.lora import LoraWeights, parse_lora
from adapterd.server.adapters.prefix import PrefixWeights, parse_prefix
from adapterd.server.errors import AdapterdError, DataLoss, FailedPrecondition, ResourceExhausted
from adapterd.server.pinned import DEFAULT_MAX_BYTES, HostBufferPool
from adapterd.server.safetensors_io import read_tensors

log = logging.getLogger(__name__)

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
    weights = parse_lora(config, tensors, base.linear_shapes, base.max_lora_rank, base.dtype)
    modules = list(weights.modules.values())
    if any(t.dtype != base.dtype for m in modules for t in (m.a, m.b)):  # else: already one pinned buffer
        packed = pack_host([t for m in modules for t in (m.a, m.b)], base.dtype, pin=base.device.type == "cuda",
                           pool=_host_pool.get())
        for i, m in enumerate(modules):
            m.a, m.b = packed[2 * i], packed[2 * i + 1]
    return {"lora": weights}


def _load_prefix(config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseShape) -> dict[str, Any]:
    weights = parse_prefix(config, tensors, base.num_layers, base.num_kv_heads, base.head_dim)
    return {"prefix": weights.to(base.device, base.dtype)}


# peft_type -> loader. A new adapter type is one entry here and one module beside this one.
ADAPTER_KINDS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor], BaseShape], dict[str, Any]]] = {
    "LORA": _load_lora,
    "PREFIX_TUNING": _load_prefix,
}


def read_adapter_files(path: Path, pin: bool = False,
                       pool: HostBufferPool | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter's config and tensors (pinned, one read, into a buffer lent by ``pool`` when given: see
    ``read_tensors``), turning every kind of damage into a clear error."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataLoss(f"{CONFIG_FILE} is unreadable or not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DataLoss(f"{CONFIG_FILE} is not a JSON object")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise FailedPrecondition("only safetensors weights are loaded (found adapter_model.bin: "
                                     "convert it with safetensors, pickle is never unpickled)")
        raise DataLoss(f"{WEIGHTS_FILE} is missing")
    try:
        tensors = read_tensors(weights, pin=pin, pool=pool)
    except DataLoss as exc:
        raise DataLoss(f"{WEIGHTS_FILE} is corrupt or truncated: {exc}") from exc
    except OSError as exc:
        raise DataLoss(f"{WEIGHTS_FILE} is unreadable: {exc}") from exc
    return config, tensors


def _lenient_int(value: Any) -> int:
    """A number for ListAdapters' description of an unloaded adapter; 0 for anything that is not one, so
    that one malformed config (the load reports it properly) cannot break listing every adapter."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


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
                 host_pool_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.base = base
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
        self._last_used: dict[str, float] = {}
        self._generation = 0
        self.is_on_device: Callable[[LoadedAdapter], bool] = lambda adapter: False
        self.on_unload: Callable[[LoadedAdapter], None] = lambda adapter: None
        # Called after each load attempt: (adapter_id, seconds it took, the adapter or the error). Metrics.
        self.on_load: Callable[[str, float, LoadedAdapter | BaseException], None] = lambda *attempt: None

    def resolve(self, adapter_id: str, field: str = "adapter_id") -> Path:
        return resolve_adapter_dir(self.root, adapter_id, field)

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
        rec.size_bytes = sum(f.stat().st_size for f in path.glob("*") if f.is_file()) if path.is_dir() else 0
        if adapter is not None:
            rec.type, rec.rank, rec.num_virtual_tokens = adapter.type, adapter.rank, adapter.num_virtual_tokens
            rec.target_modules = adapter.target_modules
            on_gpu = self.is_on_device(adapter) and self.base.device.type == "cuda"
            rec.state = RESIDENT_GPU if on_gpu or (adapter.prefix and self.base.device.type == "cuda") \
                else RESIDENT_CPU
            return rec
        rec.state = LOADING if loading else (LOAD_FAILED if error else ON_DISK)
        rec.error = error
        self._describe_from_config(rec, path)
        return rec

    def list(self) -> list[AdapterRecord]:
        return [self.record(i) for i in discover_adapter_ids(self.root)]

    def _describe_from_config(self, rec: AdapterRecord, path: Path) -> None:
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(config, dict):
            return
        rec.type = str(config.get("peft_type", ""))
        rec.base_model = str(config.get("base_model_name_or_path") or "")
        rec.rank = _lenient_int(config.get("r")) if rec.type == "LORA" else 0
        rec.num_virtual_tokens = _lenient_int(config.get("num_virtual_tokens"))
        targets = config.get("target_modules") or []
        rec.target_modules = sorted(map(str, targets)) if isinstance(targets, list) else [str(targets)]

    def _read(self, adapter_id: str, path: Path) -> LoadedAdapter:
        config, tensors = read_adapter_files(path, pool=self.host_pool)
        peft_type = str(config.get("peft_type", ""))
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
        size = sum(f.stat().st_size for f in path.glob("*") if f.is_file())
        return LoadedAdapter(adapter_id=adapter_id, type=peft_type, key=key, size_bytes=size, **parts)

