"""``Merger``: the plain object the MergeAdapter handler and ``adapterd merge`` delegate to.

It validates a request's parameters (raising ``server.errors`` types that name the request field at fault),
loads the adapters, runs the merge into a hidden temporary directory and publishes it atomically. Calls are
blocking and CPU-bound (seconds to minutes): run them in a worker thread, never on the event loop. A Merger
holds no mutable state, reads the base only from its files on disk and never touches the served model, so
one instance may serve concurrent merges.
"""

from __future__ import annotations

import contextlib
import errno
import math
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.ids import resolve_adapter_dir
from ..errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..safetensors_io import COPY_CHUNK_BYTES
from .atomic import merge_output
from .lora import LoraAdapter, load_lora_adapter
from .strategies import CombineOptions, Strategy, get_strategy
from .to_adapter import combine, model_module_order, write_adapter
from .to_model import DEFAULT_MAX_SHARD_BYTES, base_entries, merge_into_model

# (tensors_done, tensors_total, bytes_written). Raise from it to cancel: the partial output is removed.
ProgressFn = Callable[[int, int, int], None]
DISK_MARGIN_BYTES = 64 * 1024**2  # free space kept beyond the model's size (config, tokenizer, headers)
MAX_ADAPTER_BYTES = 4 * 1024**3  # tensor bytes one input adapter may declare (read whole into this process)
MAX_PATH_BYTES, MAX_NAME_BYTES = 4000, 255  # Linux's PATH_MAX (4096, with room for temporary names), NAME_MAX


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge produced. ``output`` is the model directory (absolute) or the adapter id."""

    kind: str  # "model" or "adapter"
    output: str
    tensors_total: int  # base tensors (model) or adapter modules (adapter)
    tensors_merged: int  # base tensors changed (model) or modules written (adapter)
    bytes_written: int  # size of the published directory's files
    seconds: float
    strategy: str | None = None  # adapter merges: the strategy used (one adapter is always "linear", as PEFT)
    rank: int | None = None  # adapter merges: the new adapter's rank
    seed: int | None = None  # DARE: the seed used (drawn at random when none was given, so it can be replayed)


def _overlaps(a: Path, b: Path) -> bool:
    """True if one path is the other or lies inside it (both already resolved)."""
    return a == b or a in b.parents or b in a.parents


def _check_path_text(text: str, field: str) -> None:
    """Refuse paths the file system would reject with an OSError deep inside the merge."""
    if not text:
        raise InvalidArgument("output directory is empty", field=field)
    if "\x00" in text:
        raise InvalidArgument("a path may not hold a NUL character", field=field)
    try:
        encoded = [part.encode() for part in text.split("/")]
    except UnicodeEncodeError:
        raise InvalidArgument("the path is not valid UTF-8", field=field) from None
    if len(text.encode()) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded):
        raise InvalidArgument(f"the path is longer than {MAX_PATH_BYTES} bytes or has a name longer than "
                              f"{MAX_NAME_BYTES}", field=field)


def _check_weights(adapters: Sequence[tuple[str, float]]) -> None:
    if not adapters:
        raise InvalidArgument("at least one adapter is needed", field="adapters")
    for i, (_, weight) in enumerate(adapters):
        if not math.isfinite(weight):
            raise InvalidArgument(f"weight {weight} is not a finite number", field=f"adapters[{i}].weight")


class Merger:
    """Merges adapters from ``adapter_root`` into the base at ``base_model_dir`` (its original files)."""

    def __init__(self, base_model_dir: str | Path, adapter_root: str | Path, *, output_root: str | Path | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, copy_chunk_bytes: int = COPY_CHUNK_BYTES,
                 max_adapter_bytes: int = MAX_ADAPTER_BYTES) -> None:
        """``output_root``: if given, model outputs must lie inside it (relative paths are taken from it),
        as the daemon's ``merge_output_root`` asks; None allows any path (the CLI)."""
        self.base_model_dir = Path(base_model_dir).resolve()
        self.adapter_root = Path(adapter_root).resolve()
        self.output_root = Path(output_root).resolve() if output_root is not None else None
        self.max_shard_bytes = max_shard_bytes  # output file layout; memory does not depend on it
        self.copy_chunk_bytes = copy_chunk_bytes  # bytes per copy read, and fp32 bytes per merged row block
        self.max_adapter_bytes = max_adapter_bytes

    def load_adapters(self, adapters: Sequence[tuple[str, float]], purpose: str) -> list[tuple[LoraAdapter, float]]:
        """Resolve and load each (id, weight); errors name ``adapters[i].adapter_id``."""
        _check_weights(adapters)
        loaded = []
        for i, (adapter_id, weight) in enumerate(adapters):
            field = f"adapters[{i}].adapter_id"
            path = resolve_adapter_dir(self.adapter_root, adapter_id, field)
            adapter = load_lora_adapter(path, adapter_id, field, purpose, root=self.adapter_root,
                                        max_bytes=self.max_adapter_bytes)
            loaded.append((adapter, float(weight)))
        return loaded

    def _model_output(self, output_dir: str | Path) -> Path:
        """The output directory, resolved; InvalidArgument (naming ``output_model_dir``, quoting only what the
        caller gave, never a server path) for a malformed path or one outside the root or over the inputs."""
        text = str(output_dir)
        _check_path_text(text, "output_model_dir")
        try:
            out = self._resolve_output(text)
        except OSError as exc:  # a link loop, a path too long once joined to the root
            raise InvalidArgument(f"{text[:200]!r} cannot be resolved ({exc.strerror})",
                                  field="output_model_dir") from None
        if len(bytes(out)) > MAX_PATH_BYTES:  # the file system would refuse it midway through making it
            raise InvalidArgument(f"the path is longer than {MAX_PATH_BYTES} bytes once resolved",
                                  field="output_model_dir")
        if self.output_root is not None and self.output_root not in out.parents:
            raise InvalidArgument(f"{text[:200]!r} is not inside the merge output root", field="output_model_dir")
        for other, what in ((self.base_model_dir, "the base model"), (self.adapter_root, "the adapter root")):
            if _overlaps(out, other):
                raise InvalidArgument(f"{text[:200]!r} overlaps {what}; choose a directory outside it",
                                      field="output_model_dir")
        return out

    def _resolve_output(self, text: str) -> Path:
        if self.output_root is not None:
            return (self.output_root / text).resolve()
        try:  # the command line: ~ is the user's home, as a shell would have it
            return Path(text).expanduser().resolve()
        except RuntimeError:
            raise InvalidArgument(f"{text[:200]!r} names an unknown home directory",
                                  field="output_model_dir") from None

    def _check_free_space(self, out: Path, needed: int) -> None:
        parent = next(p for p in (out, *out.parents) if p.exists())
        free = shutil.disk_usage(parent).free
        if free < needed + DISK_MARGIN_BYTES:
            raise ResourceExhausted(f"the output's file system has {free / 1e9:.2f} GB free; the merged model needs "
                                    f"{needed / 1e9:.2f} GB", field="output_model_dir")

    def merge_to_model(self, adapters: Sequence[tuple[str, float]], output_dir: str | Path, *,
                       overwrite: bool = False, progress: ProgressFn | None = None) -> MergeResult:
        """Fold ``sum_i w_i * adapter_i`` into the base weights and write a new model directory."""
        start = time.monotonic()
        out = self._model_output(output_dir)
        loaded = self.load_adapters(adapters, "folded into the base weights")
        self._check_free_space(out, sum(e.nbytes for e in base_entries(self.base_model_dir)))
        with _disk_full_as_resource_exhausted(), merge_output(out, overwrite=overwrite, marker="config.json",
                                                              field="output_model_dir") as tmp:
            stats = merge_into_model(self.base_model_dir, loaded, tmp, max_shard_bytes=self.max_shard_bytes,
                                     progress=progress, chunk_bytes=self.copy_chunk_bytes)
        return MergeResult("model", str(out), stats.tensors_total, stats.tensors_merged, stats.bytes_written,
                           time.monotonic() - start)

    def merge_to_adapter(self, adapters: Sequence[tuple[str, float]], output_adapter_id: str, *,
                         strategy: str = "linear", density: float | None = None, majority_sign_method: str = "",
                         seed: int | None = None, rank: int = 0, overwrite: bool = False,
                         progress: ProgressFn | None = None) -> MergeResult:
        """Combine adapters into a new adapter ``output_adapter_id`` under the adapter root.

        ``strategy``: a name in ``STRATEGIES`` (see ``strategy_name_from_proto``). ``density`` in (0, 1] is
        required by ties/dare_*; ``majority_sign_method`` "" means "total"; ``seed`` None draws one (DARE);
        ``rank`` 0 means the strategy's default (svd: the largest input rank).
        """
        start = time.monotonic()
        chosen = get_strategy(strategy or "linear")
        out = self._adapter_output(output_adapter_id)
        loaded = self.load_adapters(adapters, "combined into a LoRA adapter")
        if any(_overlaps(out, a.path.resolve()) for a, _ in loaded):
            raise InvalidArgument("the output adapter overlaps one of the input adapters",
                                  field="output_adapter_id")
        if rank < 0:
            raise InvalidArgument("rank must be >= 0", field="rank")
        if len(loaded) == 1:  # PEFT: "if there is only one adapter, we can only use linear merging"
            chosen = get_strategy("linear")
        opts, used_seed = _options(chosen, density, majority_sign_method, seed)
        base_order = model_module_order(self.base_model_dir)
        config, state = combine(loaded, chosen, opts, rank, base_order, progress)
        with _disk_full_as_resource_exhausted("the merged adapter", "output_adapter_id"), \
                merge_output(out, overwrite=overwrite, marker="adapter_config.json",
                             field="output_adapter_id") as tmp:
            written = write_adapter(tmp, config, state)
        modules = len(state) // 2
        if progress is not None:
            progress(modules, modules, written)
        return MergeResult("adapter", output_adapter_id, modules, modules, written, time.monotonic() - start,
                           strategy=chosen.name, rank=int(config["r"]), seed=used_seed)

    def _adapter_output(self, output_adapter_id: str) -> Path:
        return resolve_adapter_dir(self.adapter_root, output_adapter_id, "output_adapter_id", must_exist=False)


def _options(strategy: Strategy, density: float | None, method: str,
             seed: int | None) -> tuple[CombineOptions, int | None]:
    """Validate the strategy's parameters; returns the options and the DARE seed actually used."""
    method = method or "total"
    if method not in ("total", "frequency"):
        raise InvalidArgument(f"majority_sign_method must be 'total' or 'frequency', not {method!r}",
                              field="majority_sign_method")
    if strategy.needs_density and (density is None or not 0 < density <= 1):
        raise InvalidArgument(f"strategy {strategy.name} needs a density in (0, 1] (the fraction of weights "
                              f"kept), got {density}", field="density")
    used_seed: int | None = None
    generator: torch.Generator | None = None
    if strategy.uses_rng:
        used_seed = secrets.randbits(63) if seed is None else int(seed)
        generator = torch.Generator().manual_seed(used_seed)
    return CombineOptions(density if strategy.needs_density else None, method, generator), used_seed


@contextlib.contextmanager
def _disk_full_as_resource_exhausted(what: str = "the merged model",
                                     field: str = "output_model_dir") -> Iterator[None]:
    """Turn ENOSPC/EDQUOT (disk full, quota) into ResourceExhausted, and errors of the requested path into
    FailedPrecondition. ``merge_output`` sits inside this context, so the partial output is already removed
    when the error is converted."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"disk full while writing {what}", field=field) from exc
        if exc.errno in _CALLERS_PATH_ERRORS:  # the path asked for cannot be written: say why, not where
            raise FailedPrecondition(f"cannot write {what} there: {exc.strerror}", field=field) from exc
        raise


# Errors that the requested output path causes (a file where a directory is needed, no permission, a
# read-only file system, a link loop), as opposed to failures of the machine.
_CALLERS_PATH_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                                  errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY})
