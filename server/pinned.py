"""A pool of reusable host buffers for adapter loads: page-locked on a CUDA daemon, pageable on a CPU one.

Why: a cold load reads an adapter file (r=16 Llama-2-7B q/k/v/o: 32 MiB of tensor data) into one host buffer.
A fresh buffer per load pays for its memory before the read can use it: page-locking (``cudaHostAlloc``) on
a GPU host, first-touch page faults on pageable memory. On the CPU machine, reading 32 MiB from the page
cache into a fresh buffer takes 17-21 ms, into a reused one 3.2 ms (``bench/NOTES.md``, "Cold loads"). On the
H200 host, ``read_tensors`` of that file (p50 of 20): 20-24 ms into a fresh page-locked buffer while the
earlier ones live, 9.5 ms into a pooled one; its copy to the GPU takes 0.7 ms from page-locked memory and
4.1-5.0 ms from pageable memory.

What the store keeps: a loaded LoRA adapter's host weights are views into the buffer its file was read into,
kept for as long as the adapter is loaded (a later slot fill copies them to the device again). So a buffer is
*lent* to the adapter, not used and returned at once; it comes back to the pool when the adapter is unloaded
and the last row using it has finished. Copying the weights out of a pool buffer into memory of their own
instead would let the buffer come back at once, but that memory is fresh again: read into a reused buffer then
cloned into a fresh one took 11.6-14.5 ms on the CPU machine, against 3.2 ms for the read alone.

Lifetime: a lent buffer is handed out as a tensor whose storage is a numpy view of exactly the requested
bytes; the storage holds the only reference to that view, so the view dies when the last tensor sharing the
storage dies (``weakref.finalize`` reports it; CPython does so at once, in the thread that dropped it). On a
CUDA pool, that moment also records a CUDA event on the releasing thread's current stream (and the device's
default stream when they differ): a slot fill (``lora_slots.stage_on``) copies out of the buffer with
``non_blocking=True`` on the engine thread's current stream, which is the default stream, and that copy was
enqueued before its source tensor could die, so the event completes only after the copy has. A buffer is lent
again only once its events have completed (``take`` waits for them, outside the lock). When the last view dies
while the releasing thread is capturing a CUDA graph, no event can be recorded without breaking the capture:
the buffer is then marked for a device synchronisation before its next use (rare; correct either way).

Bounds: the pool owns at most ``max_bytes`` of buffers, lent or free. Each buffer is sized by need, to the
request it was allocated for (page-locked sizes rounded up to a power of two, as PyTorch's caching host
allocator rounds the blocks it locks; pageable ones to 1 MiB); a free buffer too small for a request is dropped
to make room for a larger one, so the pool grows with the largest file it sees. Buffers are not all sized to
the largest file seen: a buffer stays lent for as long as its adapter is loaded, so a rank-8 adapter would
hold a rank-64 adapter's worth of locked memory. Past the cap a request gets a fresh pageable buffer of its
own (19-25 ms to read on the H200 host, about the pre-pool cost, without locking more memory; its slot fills
then copy synchronously, 4-5 ms instead of 0.7 ms for 32 MiB).

Thread safety: ``take`` runs under a lock; a release never takes it (it may run in any thread, including
one inside ``take`` if the cyclic garbage collector fires there): it appends to a deque that ``take`` drains.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Bytes the pool may own, lent and free together. 32 r=16 Llama-2-7B q/k/v/o adapters (32 MiB of tensors
# each), the working set of a batch of 32 distinct adapters; on a GPU host with hundreds of GiB of RAM, a small
# share of memory that cannot be swapped out.
DEFAULT_MAX_BYTES = 1024 * MIB
PAGEABLE_GRANULE = MIB  # pageable buffers are rounded up to this many bytes, so near sizes share buffers


@dataclass(eq=False)
class _Buffer:
    backing: torch.Tensor  # uint8 [capacity], owned by the pool
    events: list = field(default_factory=list)  # CUDA events recorded when it was last released
    sync_device: bool = False  # released during a graph capture: synchronise the device before reuse

    @property
    def capacity(self) -> int:
        return self.backing.numel()


class HostBufferPool:
    """Host buffers lent for adapter reads and reused once every view of them is gone (module docstring).

    ``pin``: page-locked buffers for asynchronous copies to ``device`` (a CUDA device); otherwise pageable.
    ``allocate(nbytes)``: how a new buffer is made (a uint8 tensor of ``nbytes``); tests inject their own.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, pin: bool = False,
                 device: torch.device | str | None = None,
                 allocate: Callable[[int], torch.Tensor] | None = None) -> None:
        self.max_bytes = max_bytes
        self.pin = pin
        if pin and device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device) if device is not None else None
        self._allocate = allocate or self._default_allocate
        self._lock = threading.Lock()
        self._free: list[_Buffer] = []
        self._released: collections.deque[tuple[_Buffer, bool]] = collections.deque()
        self.pool_bytes = 0  # capacity of every buffer the pool owns, lent or free (bytes)
        self.reuses = 0  # requests served by a buffer lent before
        self.allocations = 0  # buffers the pool allocated
        self.fallbacks = 0  # requests past the cap (or a failed page-locked allocation): a private buffer

    # ------------------------------------------------------------------ sizes and allocation

    def capacity_for(self, nbytes: int) -> int:
        """Bytes of the buffer allocated for a request of ``nbytes``: what it really takes from the host."""
        if self.pin:
            return 1 << max(nbytes - 1, 1).bit_length()
        return -(-nbytes // PAGEABLE_GRANULE) * PAGEABLE_GRANULE

    def _default_allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    # ------------------------------------------------------------------ lending

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` whose storage holds exactly those bytes (so a copy of its whole
        storage, as ``stage_on`` makes, moves no more). Contents are undefined (a reused buffer keeps the
        bytes of its last use). The buffer returns to the pool when the last tensor sharing the storage dies."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        fresh = 0
        with self._lock:
            self._collect()
            buf = min((b for b in self._free if b.capacity >= nbytes), key=lambda b: b.capacity, default=None)
            if buf is not None:
                self._free.remove(buf)
                self.reuses += 1
            else:
                fresh = self.capacity_for(nbytes)
                lent = self.pool_bytes - sum(b.capacity for b in self._free)
                if lent + fresh > self.max_bytes:  # even without its free buffers the pool is too full
                    self.fallbacks += 1
                    return torch.empty(nbytes, dtype=torch.uint8)
                # Every free buffer is too small: drop the smallest until the new one fits under the cap.
                self._free.sort(key=lambda b: b.capacity)
                while self.pool_bytes + fresh > self.max_bytes:
                    self.pool_bytes -= self._free.pop(0).capacity
                self.pool_bytes += fresh  # reserved now, so concurrent takes respect the cap
        if buf is None:
            try:
                buf = _Buffer(self._allocate(fresh))
            except RuntimeError as exc:  # page-locking refused (ulimit, memory): serve this one pageable
                log.warning("host buffer pool: allocating %d bytes failed (%s); using pageable memory", fresh, exc)
                with self._lock:
                    self.pool_bytes -= fresh
                    self.fallbacks += 1
                return torch.empty(nbytes, dtype=torch.uint8)
            with self._lock:
                self.allocations += 1
        else:
            self._wait(buf)
        return self._lend(buf, nbytes)

    def _wait(self, buf: _Buffer) -> None:
        """Block until every copy out of ``buf``'s last use has completed (normally long done)."""
        if buf.sync_device:
            torch.cuda.synchronize(self.device)
        for event in buf.events:
            event.synchronize()
        buf.events, buf.sync_device = [], False

    def _lend(self, buf: _Buffer, nbytes: int) -> torch.Tensor:
        view = buf.backing[:nbytes].numpy()  # a new ndarray: the storage below holds the only reference
        done = weakref.finalize(view, self._release, buf)
        done.atexit = False  # at interpreter exit there is nothing to return the buffer to
        return torch.from_numpy(view)

    def _release(self, buf: _Buffer) -> None:
        """The last view of ``buf`` died (any thread; never takes the lock, see the module docstring)."""
        ok = True
        if self.pin:
            try:
                if torch.cuda.is_current_stream_capturing():
                    buf.sync_device = True
                else:
                    current = torch.cuda.current_stream(self.device)
                    streams = [current]
                    default = torch.cuda.default_stream(self.device)
                    if default != current:
                        streams.append(default)
                    buf.events = [stream.record_event() for stream in streams]
            except Exception:  # noqa: BLE001 - CUDA torn down (exit) or broken: never reuse this buffer
                ok = False
        self._released.append((buf, ok))

    def _collect(self) -> None:
        """Move released buffers to the free list (under the lock)."""
        while self._released:
            buf, ok = self._released.popleft()
            if ok:
                self._free.append(buf)
            else:
                self.pool_bytes -= buf.capacity

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._collect()
            free = sum(b.capacity for b in self._free)
            return {"pool_bytes": self.pool_bytes, "free_bytes": free, "lent_bytes": self.pool_bytes - free,
                    "reuses": self.reuses, "allocations": self.allocations, "fallbacks": self.fallbacks}
