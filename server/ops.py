"""The long-running operations beside serving: merges and training runs, as the RPC handlers see them.

A merge runs in a worker thread (never on the event loop, never in the engine thread) and reports progress
through a queue; a client that leaves cancels it at its next tensor, and the half-written output is removed.
Training runs are separate OS processes, owned by ``TrainingManager``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator

from adapterd.server.adapters.store import AdapterStore
from adapterd.server.errors import FailedPrecondition, InvalidArgument
from adapterd.server.merge import Merger, MergeResult, strategy_name_from_proto
from adapterd.server.training import TrainingManager
from adapterd.v1 import adapterd_pb2 as pb

MERGE_NICE = 15  # nice value of a merge's worker thread (0 normal, 19 lowest)


class MergeCancelled(Exception):
    """Raised inside the merge thread when its client has gone."""


def _weighted(request: pb.MergeAdapterRequest) -> list[tuple[str, float]]:
    if not request.adapters:
        raise InvalidArgument("name at least one adapter", field="adapters")
    return [(a.adapter_id, a.weight or 1.0) for a in request.adapters]


def _lower_this_threads_priority() -> None:
    """A merge is background work: on Linux a thread has its own nice value, so the scheduler gives the
    engine thread the CPU first when both want it."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MERGE_NICE)


def _run_merge(merger: Merger, request: pb.MergeAdapterRequest, progress) -> MergeResult:
    _lower_this_threads_priority()
    adapters = _weighted(request)
    target = request.WhichOneof("output")
    if target == "output_model_dir":
        if request.strategy not in (pb.MERGE_STRATEGY_UNSPECIFIED, pb.LINEAR):
            raise InvalidArgument("merging into full weights sums the weighted adapters; strategies apply to "
                                  "output_adapter_id", field="strategy")
        return merger.merge_to_model(adapters, request.output_model_dir, overwrite=request.overwrite,
                                     progress=progress)
    if target == "output_adapter_id":
        return merger.merge_to_adapter(
            adapters, request.output_adapter_id, strategy=strategy_name_from_proto(request.strategy),
            density=request.density or None, majority_sign_method=request.majority_sign_method,
            seed=request.seed if request.HasField("seed") else None, rank=request.rank,
            overwrite=request.overwrite, progress=progress)
    raise InvalidArgument("set output_model_dir or output_adapter_id", field="output")


async def merge_stream(merger: Merger, store: AdapterStore,
                       request: pb.MergeAdapterRequest) -> AsyncIterator[pb.MergeProgress]:
    """Run one merge in a worker thread; yield its progress, then a last message with ``done``."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
    gone = threading.Event()

    def progress(done: int, total: int, written: int) -> None:
        if gone.is_set():
            raise MergeCancelled
        loop.call_soon_threadsafe(updates.put_nowait, (done, total, written))

    task = asyncio.ensure_future(asyncio.to_thread(_run_merge, merger, request, progress))
    try:
        while not task.done():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                done, total, written = getter.result()
                yield pb.MergeProgress(tensors_done=done, tensors_total=total, bytes_written=written)
            else:
                getter.cancel()
        result = task.result()
    finally:
        if not task.done():  # the client left: stop the merge at its next tensor
            gone.set()
            with contextlib.suppress(BaseException):
                await task
    if result.kind == "adapter":
        await asyncio.to_thread(store.unload, result.output)  # an overwritten id must not serve the old copy
    yield pb.MergeProgress(tensors_done=result.tensors_total, tensors_total=result.tensors_total, done=True,
                           output=result.output, bytes_written=result.bytes_written)


def require_training(manager: TrainingManager | None) -> TrainingManager:
    if manager is None:
        raise FailedPrecondition("training is off: start the daemon with --runs DIR")
    return manager
