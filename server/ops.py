"""The long-running operations beside serving: merges and training runs, as the RPC handlers see them.

A merge runs in its own process at a low priority (``adapterd.server.merge.worker``), so that it takes
neither the serving process's interpreter lock nor its cores first; it reports progress as JSON lines, and a
client that leaves stops it, which removes the half-written output.
Training runs are separate OS processes, owned by ``TrainingManager``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

from ..v1 import adapterd_pb2 as pb
from . import errors
from .errors import AdapterdError, FailedPrecondition
from .merge import Merger
from .merge.worker import job_line
from .training import TrainingManager

MERGE_NICE = 10  # nice value of the merge process (0 normal, 19 lowest): serving gets the CPU first


def _error_from(message: dict) -> AdapterdError:
    """Rebuild the worker's error as the same AdapterdError type, with its field."""
    kind = getattr(errors, str(message.get("error")), None)
    if not (isinstance(kind, type) and issubclass(kind, AdapterdError)):
        kind = errors.AdapterdError
    return kind(str(message.get("message", "")), field=message.get("field"))


async def merge_stream(merger: Merger, unload: Callable[[str], Awaitable[object]],
                       request: pb.MergeAdapterRequest) -> AsyncIterator[pb.MergeProgress]:
    """Run one merge in its own low-priority process; yield its progress, then a last message with ``done``.
    A client that leaves stops the process, which removes its partial output. ``unload``: the runtime's, so
    that an adapter the merge overwrote is read again from disk when next asked for."""
    output_root = str(merger.output_root) if merger.output_root is not None else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapterd.server.merge.worker", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    result: dict | None = None
    try:
        # Before it has imported torch; set here rather than in a preexec hook, which is unsafe with threads.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, MERGE_NICE)
        proc.stdin.write(job_line(str(merger.base_model_dir), str(merger.adapter_root), output_root, request))
        await proc.stdin.drain()
        proc.stdin.close()
        async for line in proc.stdout:
            message = json.loads(line)
            if "progress" in message:
                done, total, written = message["progress"]
                yield pb.MergeProgress(tensors_done=done, tensors_total=total, bytes_written=written)
            elif "error" in message:
                raise _error_from(message)
            else:
                result = message["result"]
        stderr = await proc.stderr.read()
        if await proc.wait() != 0 or result is None:
            raise errors.AdapterdError(f"the merge process failed: {stderr.decode(errors='replace')[-2000:]}")
    finally:
        if proc.returncode is None:  # the client left, or we failed: stop the merge; it cleans up
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
    if result["kind"] == "adapter":
        await unload(result["output"])  # an overwritten id must not serve the old copy
    yield pb.MergeProgress(tensors_done=result["tensors_total"], tensors_total=result["tensors_total"], done=True,
                           output=result["output"], bytes_written=result["bytes_written"])


def require_training(manager: TrainingManager | None) -> TrainingManager:
    if manager is None:
        raise FailedPrecondition("training is off: start the daemon with --runs DIR")
    return manager
