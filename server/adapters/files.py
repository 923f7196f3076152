"""An adapter's files, read with bounds: every file inside the root, regular, of bounded size and shape.

Adapter directories come from tenants, so nothing in them may stall, exhaust or escape the daemon:

- each file's own real path must lie inside the adapter root (a symlinked ``adapter_model.safetensors``
  pointing elsewhere is refused, not only a symlinked directory);
- only regular files are opened, non-blocking (a FIFO named ``adapter_config.json`` used to hang the event
  loop), see ``safetensors_io.open_regular``;
- ``adapter_config.json`` is read up to ``MAX_CONFIG_BYTES`` (one byte more is read to tell "larger") and
  nested at most ``MAX_CONFIG_DEPTH`` levels; the weights are checked from their header before any tensor
  byte is read, against a cap derived from the base (``adapter_bytes_cap``).

Errors name the adapter's file, never a server path: DataLoss for a damaged file, FailedPrecondition for one
that is too large, not a regular file, or outside the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataLoss, FailedPrecondition
from ..pinned import HostBufferPool
from ..safetensors_io import open_regular, read_at, read_tensors
from .ids import CONFIG_FILE, WEIGHTS_FILE

MAX_CONFIG_BYTES = 1 << 20  # a PEFT config is a few KB; patterns for every module of a 70B model fit in 1 MiB
MAX_CONFIG_DEPTH = 16  # PEFT configs nest 3 levels (patterns, layers_pattern lists)
TEMPLATE_FILE = "chat_template.jinja"  # the adapter's chat template, as transformers saves a tokenizer's
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where older transformers kept it (``chat_template``)
MAX_TEMPLATE_BYTES = 256 << 10  # real templates take 1-20 KB (Llama 3.1's, with tool calls: 5 KB)
MIN_ADAPTER_BYTES_CAP = 64 << 20  # a floor for small bases: prefix tables and projections are not rank-bound
CAP_ITEM_BYTES = 8  # adapters may be stored in F64: the cap allows the widest float dtype
MAX_COUNT = (1 << 31) - 1  # ranks and virtual token counts are uint32 in the API; real ones are < 10,000
MAX_LISTED_TEXT = 256  # characters of one listed string (a target module, the base model's name)
MAX_LISTED_TARGETS = 64  # target modules listed for one adapter


def adapter_bytes_cap(linear_shapes: dict[str, tuple[int, int]], max_rank: int) -> int:
    """The largest tensor data an adapter file may declare for this base, bytes: LoRA on every linear at the
    maximum rank in F64, or ``MIN_ADAPTER_BYTES_CAP`` when that is larger (P-Tuning v2 tables of a small
    base). Llama-2-7B at rank 64: 1.3 GB."""
    lora = CAP_ITEM_BYTES * max_rank * sum(i + o for i, o in linear_shapes.values())
    return max(lora, MIN_ADAPTER_BYTES_CAP)


def adapter_file(root: Path, adapter_dir: Path, name: str) -> Path:
    """``adapter_dir/name`` with symlinks resolved, refused (FailedPrecondition) unless it lies inside the
    real ``root``. The directory was already confined by ``resolve_adapter_dir``; this confines the file."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(adapter_dir / name)
    if not real.startswith(real_root + os.sep):
        raise FailedPrecondition(f"{name} resolves outside the adapter root")
    return Path(real)


def parse_config(raw: bytes, label: str = CONFIG_FILE) -> dict[str, Any]:
    """A config's bytes as a JSON object, refusing damage (DataLoss) and nesting past ``MAX_CONFIG_DEPTH``."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FailedPrecondition(f"{label} is nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and integers of > 4300 digits
        raise DataLoss(f"{label} is not valid JSON ({_reason(exc)})") from None
    if not isinstance(config, dict):
        raise DataLoss(f"{label} is not a JSON object")
    if _depth(config) > MAX_CONFIG_DEPTH:
        raise FailedPrecondition(f"{label} is nested more than {MAX_CONFIG_DEPTH} levels deep")
    return config


def _reason(exc: Exception) -> str:
    """A decoder's complaint without the text it quotes (which could be anything, of any length)."""
    return str(exc).split(":", 1)[0][:120] if isinstance(exc, json.JSONDecodeError) else type(exc).__name__


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def read_small_file(path: Path, label: str, max_bytes: int) -> bytes:
    """The bytes of the file at ``path`` (already confined by ``adapter_file``), at most ``max_bytes``."""
    try:
        fd = open_regular(path, label)
    except FileNotFoundError:
        raise DataLoss(f"{label} is missing") from None
    except OSError as exc:
        raise DataLoss(f"{label} is unreadable ({exc.strerror})") from None
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise FailedPrecondition(f"{label} is larger than {max_bytes} bytes")
        buffer = bytearray(max_bytes + 1)  # one byte more tells a file that grew meanwhile
        raw = bytes(buffer[:read_at(fd, memoryview(buffer), 0)])
    except OSError as exc:
        raise DataLoss(f"{label} is unreadable ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise FailedPrecondition(f"{label} is larger than {max_bytes} bytes")
    return raw


def read_config(path: Path, label: str = CONFIG_FILE) -> dict[str, Any]:
    """The config at ``path`` (already confined by ``adapter_file``), read up to ``MAX_CONFIG_BYTES``."""
    return parse_config(read_small_file(path, label, MAX_CONFIG_BYTES), label)


def read_chat_template(root: Path, path: Path) -> str | None:
    """The chat template saved with the adapter's tokenizer, or None: ``chat_template.jinja`` (how
    transformers saves one now), else the ``chat_template`` of ``tokenizer_config.json`` (how it did before;
    a list of named templates gives its ``default``). Confined and bounded like every adapter file."""
    if os.path.lexists(path / TEMPLATE_FILE):
        raw = read_small_file(adapter_file(root, path, TEMPLATE_FILE), TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
        try:
            return raw.decode("utf-8") or None
        except UnicodeDecodeError:
            raise DataLoss(f"{TEMPLATE_FILE} is not UTF-8 text") from None
    if not os.path.lexists(path / TOKENIZER_CONFIG_FILE):
        return None
    template = read_config(adapter_file(root, path, TOKENIZER_CONFIG_FILE), TOKENIZER_CONFIG_FILE).get(
        "chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise FailedPrecondition(f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string")
    return template or None


def read_weights(root: Path, path: Path, *, pin: bool = False, pool: HostBufferPool | None = None,
                 max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The adapter's ``adapter_model.safetensors``, confined to ``root`` and checked from its header before
    any tensor byte is read (``read_tensors``); file-system errors become DataLoss naming the file."""
    try:
        return read_tensors(adapter_file(root, path, WEIGHTS_FILE), pin=pin, pool=pool, max_data_bytes=max_bytes)
    except FileNotFoundError:
        raise DataLoss(f"{WEIGHTS_FILE} is missing") from None
    except OSError as exc:
        raise DataLoss(f"{WEIGHTS_FILE} is unreadable ({exc.strerror})") from None


def listed_text(value: Any, limit: int = MAX_LISTED_TEXT) -> str:
    """A string fit for a response: clipped to ``limit`` characters, and encodable (JSON may hold lone
    surrogates, which protobuf refuses, and that failed the whole listing)."""
    return str(value)[:limit].encode("utf-8", "replace").decode("utf-8")
