"""Checkpoints: ``RUN_DIR/checkpoint-N`` = a PEFT adapter directory + the state for an exact resume.

Layout of one checkpoint (N = optimizer steps done):
  adapter_config.json, adapter_model.safetensors   what ``PeftModel.from_pretrained`` and the daemon load
  tokenizer files, chat_template.jinja             the tokenizer with the template examples were formatted
                                                   with (``template.py``): the daemon renders chat with it
  trainer_state.pt                                 optimizer, scheduler, RNG states, step, data position
  trainer_state.json                               the same numbers for people (step, epoch, loss)

A checkpoint is published by ``common.fsutil.AtomicDir`` (a temporary name ``.checkpoint-N.tmp-*``, files given
the umask's mode and fsync'ed, then renamed): a crash or ``kill -9`` at any moment leaves either the whole
checkpoint or none, never one that looks whole.
Only names matching ``checkpoint-N`` count as checkpoints; stale temporary directories are removed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.fsutil import AtomicDir
from .template import save_tokenizer_with_template

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"
TRAINER_FILES = ("trainer_state",)  # a checkpoint's files that resume a run; every other one is the adapter's


class NonFiniteAdapter(RuntimeError):
    """Adapter weights holding NaN or infinity: never written as a checkpoint, never exported (served, one
    such tensor would turn its rows' outputs into NaN)."""


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ``NonFiniteAdapter`` naming the first tensor that holds a NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteAdapter(f"{where}: {name} holds NaN or infinite values (lower the learning rate "
                                   "or lora_alpha, or keep gradient clipping on); refusing to save it")


def check_adapter_file(adapter_dir: Path) -> None:
    """Check a saved adapter as the daemon and the merger read it (``peft_format``: config, tensor pairing,
    shapes, finiteness); NonFiniteAdapter naming the tensor that holds NaN or an infinity."""
    from ..server.adapters.peft_format import check_adapter, check_finite, read_adapter
    from ..server.errors import FailedPrecondition

    files = read_adapter(adapter_dir, adapter_dir)
    try:
        check_finite(files.tensors)
    except FailedPrecondition as exc:
        raise NonFiniteAdapter(f"{adapter_dir.name}: {exc.message} (lower the learning rate or lora_alpha, or "
                               "keep gradient clipping on); refusing to export it") from None
    check_adapter(files)


@dataclass
class DataPosition:
    """Where the data loader stands after the last optimizer step: the epoch (0-based) and how many
    micro-batches of that epoch were consumed. The epoch's order is ``data.epoch_order(seed, epoch)``."""

    epoch: int = 0
    batch_in_epoch: int = 0


def rng_state() -> dict[str, Any]:
    """Every random generator the training step touches (dropout draws from torch's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / "adapter_config.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(run_dir: Path, spec: str) -> Path:
    """``latest`` -> the newest complete checkpoint; ``checkpoint-N`` -> that one under ``run_dir``; else a
    path. FileNotFoundError when there is none."""
    if spec in ("", "latest"):
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {run_dir}")
        return found[-1][1]
    path = run_dir / spec if _NAME.match(spec) else Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def remove_stale(run_dir: Path) -> None:
    """Delete temporary directories left by a crash while a checkpoint was being written or replaced."""
    for pattern in (".checkpoint-*.tmp-*", ".checkpoint-*.old-*"):
        for p in run_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, peft_model: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, position: DataPosition, extra: dict[str, Any], keep_last: int,
                    tokenizer: Any = None, prompt_format: str = "alpaca") -> Path:
    """Write ``checkpoint-<step>`` atomically (``AtomicDir``: a checkpoint of that step from another timeline,
    after a resume from an older one, is replaced), then drop the oldest beyond ``keep_last`` (0 keeps all).
    With ``tokenizer``, the checkpoint holds it with the template of ``prompt_format`` as its chat template."""
    final = run_dir / f"checkpoint-{step}"
    check_finite({n: p for n, p in peft_model.named_parameters() if p.requires_grad}, f"checkpoint-{step}")
    with AtomicDir(final, replace=True) as tmp:
        peft_model.save_pretrained(str(tmp))
        if tokenizer is not None:
            save_tokenizer_with_template(tokenizer, tmp, prompt_format)
        state = {"step": step, "position": asdict(position), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra}
        torch.save(state, tmp / STATE_FILE)
        summary = {"step": step, **asdict(position), **{k: v for k, v in extra.items() if _jsonable(v)}}
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The resume state. ``weights_only=False``: it holds Python RNG state; only load your own checkpoints."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


def load_adapter_weights(peft_model: Any, checkpoint: Path) -> None:
    """Put a checkpoint's adapter weights into the (freshly built, same-config) PEFT model. They are read as
    the daemon reads adapters (``peft_format.read_adapter``: safetensors only, confined to the checkpoint,
    checked from the header before a byte of data is read) and checked as an export is (``check_adapter``)."""
    from peft import set_peft_model_state_dict

    from ..server.adapters.peft_format import check_adapter, read_adapter

    files = read_adapter(checkpoint, checkpoint)
    check_adapter(files)
    result = set_peft_model_state_dict(peft_model, files.tensors)
    unexpected = [key for key in getattr(result, "unexpected_keys", None) or []
                  if not _prefix_arrived(peft_model, files.tensors, key)]
    if unexpected:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit this model: {unexpected[:3]}")


def _prefix_arrived(peft_model: Any, tensors: dict[str, Any], key: str) -> bool:
    """True for a prompt-learning adapter's ``prompt_embeddings`` that its prompt encoder now holds. PEFT
    (0.21.2) loads that key into the encoder after ``load_state_dict`` has already listed it as unexpected, so
    the list alone would refuse every P-Tuning v2 checkpoint; the encoder's weight is the evidence instead."""
    adapter = peft_model.active_adapter
    if key != "prompt_embeddings" or not peft_model.peft_config[adapter].is_prompt_learning:
        return False
    held = peft_model.prompt_encoder[adapter].embedding.weight.detach()
    return bool(torch.equal(held.to("cpu", tensors[key].dtype), tensors[key].cpu()))


def export_adapter(source: Path, target: Path) -> Path:
    """Copy an adapter directory to ``target`` atomically (copy to a sibling temporary name, then rename).
    Only the adapter's own files travel (its weights and config, the tokenizer with its chat template), not the
    trainer state, and only their contents: the copies follow the process umask like any other output, not the
    checkpoint files' modes. Refuses to overwrite, and refuses an adapter
    whose weights are not all finite (a checkpoint written by an older version, say)."""
    with AtomicDir(target) as tmp:  # FileExistsError when the target exists
        check_adapter_file(source)
        for p in source.iterdir():
            if p.is_file() and not p.name.startswith(TRAINER_FILES):
                shutil.copyfile(p, tmp / p.name)
    return target
