"""Checks of the admin and training requests' ids, paths and options, made in the handler before anything
runs: each failure is INVALID_ARGUMENT naming the field. (GenerateRequest has ``validation.py``.)

The merger, the merge worker and the training manager check what they know best (an adapter that exists,
a strategy's density, a trainer option's value); these checks catch what would otherwise reach the file
system or a child process malformed: a NUL byte or a huge string in a path, an id that is not an id, a
run id that is not a run id, an unknown enum value, an absurd number of entries.
"""

from __future__ import annotations

import math

from ..v1 import adapterd_pb2 as pb
from .adapters.ids import validate_adapter_id
from .errors import InvalidArgument
from .training import RUN_ID

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_MERGE_INPUTS = 64
MAX_OPTIONS = 64
MAX_OPTION_CHARS = 1024
MAX_MERGE_RANK = 65_536  # far above any LoRA rank; keeps an SVD from being asked for billions of rows


def check_path(path: str, field: str, *, required: bool = True) -> None:
    if not path:
        if required:
            raise InvalidArgument("is required", field=field)
        return
    if len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(f"longer than {MAX_PATH_CHARS} characters", field=field)
    if "\x00" in path:
        raise InvalidArgument("contains a NUL character", field=field)


def check_run_id(run_id: str, field: str = "run_id", *, required: bool = False) -> None:
    if not run_id:
        if required:
            raise InvalidArgument("is required", field=field)
        return
    if not RUN_ID.match(run_id):
        raise InvalidArgument("must be 1-128 of letters, digits, '_', '-', '.', not starting with a punctuation "
                              "mark", field=field)


def check_merge(request: pb.MergeAdapterRequest) -> None:
    if not request.adapters:
        raise InvalidArgument("name at least one adapter", field="adapters")
    if len(request.adapters) > MAX_MERGE_INPUTS:
        raise InvalidArgument(f"at most {MAX_MERGE_INPUTS} adapters", field="adapters")
    for i, adapter in enumerate(request.adapters):
        validate_adapter_id(adapter.adapter_id, f"adapters[{i}].adapter_id")
        if not math.isfinite(adapter.weight):
            raise InvalidArgument("must be a finite number", field=f"adapters[{i}].weight")
    output = request.WhichOneof("output")
    if output is None:
        raise InvalidArgument("set output_model_dir or output_adapter_id", field="output")
    if output == "output_adapter_id":
        validate_adapter_id(request.output_adapter_id, "output_adapter_id")
    else:
        check_path(request.output_model_dir, "output_model_dir")
    if request.strategy not in pb.MergeStrategy.values():
        raise InvalidArgument(f"unknown merge strategy {request.strategy}", field="strategy")
    if not (math.isfinite(request.density) and 0.0 <= request.density <= 1.0):
        raise InvalidArgument("must be in (0, 1], or 0 for the strategy's default", field="density")
    if len(request.majority_sign_method) > 32:
        raise InvalidArgument("must be 'total' or 'frequency'", field="majority_sign_method")
    if request.rank > MAX_MERGE_RANK:
        raise InvalidArgument(f"must be at most {MAX_MERGE_RANK}", field="rank")


def check_start_training(request: pb.StartTrainingRequest) -> None:
    check_path(request.data_path, "data_path")
    check_run_id(request.run_id)
    if request.export_adapter_id:
        validate_adapter_id(request.export_adapter_id, "export_adapter_id")
    if len(request.options) > MAX_OPTIONS:
        raise InvalidArgument(f"at most {MAX_OPTIONS} options", field="options")
    for key, value in request.options.items():
        if not key or len(key) > 64 or "\x00" in key:
            raise InvalidArgument("option names are 1 to 64 characters", field="options")
        if len(value) > MAX_OPTION_CHARS or "\x00" in value:
            raise InvalidArgument(f"at most {MAX_OPTION_CHARS} characters, no NUL", field=f"options[{key}]")
