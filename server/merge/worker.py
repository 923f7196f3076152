"""``python -m adapterd.server.merge.worker``: one MergeAdapter request, in its own process.

A merge beside serving must not take the serving process's cores or its interpreter lock: the daemon starts
this process at a low priority (every thread of it, torch's included, inherits the nice value), sends it one
JSON line (the base, the roots, the request as protobuf bytes in base64) on standard input, and reads JSON
lines back: ``{"progress": [done, total, bytes]}`` as it goes, then ``{"result": {...}}`` or
``{"error": "NotFound", "message": ..., "field": ...}``. SIGTERM (the client left) stops the merge at once and
removes its partial output, as an exception raised inside the merge does.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import signal
import sys
import traceback
from typing import Any

from ...v1 import adapterd_pb2 as pb
from ..errors import AdapterdError, InvalidArgument
from .merger import Merger, MergeResult
from .strategies import strategy_name_from_proto


class Terminated(Exception):
    """SIGTERM arrived: unwind, so that the atomic output directory removes its temporary files."""


def run_merge(merger: Merger, request: pb.MergeAdapterRequest, progress) -> MergeResult:
    """Dispatch a MergeAdapterRequest to the merger (weights 0 read as 1.0, as the proto says)."""
    if not request.adapters:
        raise InvalidArgument("name at least one adapter", field="adapters")
    adapters = [(a.adapter_id, a.weight or 1.0) for a in request.adapters]
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


def job_line(base: str, adapter_root: str, output_root: str | None, request: pb.MergeAdapterRequest) -> bytes:
    """The one line the daemon writes to the worker's standard input."""
    return (json.dumps({"base": base, "adapter_root": adapter_root, "output_root": output_root,
                        "request": base64.b64encode(request.SerializeToString()).decode()}) + "\n").encode()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    job = json.loads(sys.stdin.readline())
    request = pb.MergeAdapterRequest.FromString(base64.b64decode(job["request"]))
    merger = Merger(job["base"], job["adapter_root"], output_root=job["output_root"])
    try:
        result = run_merge(merger, request, lambda done, total, written: _say({"progress": [done, total, written]}))
    except AdapterdError as exc:
        _say({"error": type(exc).__name__, "message": exc.message, "field": exc.field})
        return 0
    except Terminated:
        return 143
    except Exception:  # noqa: BLE001 - the client gets a short INTERNAL; the traceback goes to the log only
        traceback.print_exc(file=sys.stderr)
        # "log": for the daemon's log (server/ops.py), never for the client's message.
        _say({"error": "AdapterdError", "message": "the merge failed with an internal error (see the daemon's "
                                                   "log)", "field": None, "log": traceback.format_exc()})
        return 0
    _say({"result": dataclasses.asdict(result)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
