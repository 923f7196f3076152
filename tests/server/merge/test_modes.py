"""Merged models and adapters, training checkpoints and exported trained adapters follow the process umask
like any other file (not the 0700 of a temporary directory, the 0600 of safetensors' files, nor the modes of
the files they copy): another user or a container user must be able to read them."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterd.server.merge import Merger
from adapterd.trainer.checkpoint import export_adapter


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> Iterator[int]:
    """The process umask for the test, restored after (it is process-wide)."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _modes(top: Path) -> dict[str, int]:
    """Permission bits of ``top`` and of everything under it, by path relative to ``top``."""
    modes = {".": stat.S_IMODE(top.stat().st_mode)}
    for path in top.rglob("*"):
        modes[str(path.relative_to(top))] = stat.S_IMODE(path.stat().st_mode)
    return modes


def _expected(top: Path, umask: int) -> dict[str, int]:
    """What ``mkdir`` and ``open`` give under ``umask``: 0777 for directories, 0666 for files, masked."""
    return {name: (0o777 if (top / name).is_dir() else 0o666) & ~umask for name in _modes(top)}


@pytest.fixture
def private_base(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with owner-only files (a base on a private volume): copies must not inherit that."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    for path in base.iterdir():
        path.chmod(0o600)
    return base


def test_a_merged_model_follows_the_umask(private_base, adapter_root, tmp_path, umask):
    out = tmp_path / "merged"
    Merger(private_base, adapter_root).merge_to_model([("lora-qv", 1.0)], out)
    assert _modes(out) == _expected(out, umask)
    assert (out / "config.json").is_file() and len(_modes(out)) > 3


def test_a_merged_adapter_follows_the_umask(tiny_model_dir, adapter_root, tmp_path, umask):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root, root)
    # crew/ is new: the merge makes it too
    Merger(tiny_model_dir, root).merge_to_adapter([("lora-qv", 0.5), ("lora-qv", 0.5)], "crew/merged")
    out = root / "crew" / "merged"
    assert _modes(out) == _expected(out, umask)
    assert stat.S_IMODE((root / "crew").stat().st_mode) == 0o777 & ~umask


def test_an_exported_trained_adapter_follows_the_umask(adapter_root, tmp_path, umask):
    source = tmp_path / "checkpoint-4"
    shutil.copytree(adapter_root / "lora-qv", source)
    for path in source.iterdir():
        path.chmod(0o600)  # written under a stricter umask, or by another tool
    out = export_adapter(source, tmp_path / "exported" / "v1")
    assert _modes(out) == _expected(out, umask)


def test_a_training_checkpoint_follows_the_umask(tiny_model_dir, tmp_path, umask):
    """PEFT's ``save_pretrained`` writes the weights through safetensors, whose files are 0600 whatever the
    umask: a checkpoint (which ``--resume`` and the daemon read) must follow the umask like the rest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterd.trainer.checkpoint import DataPosition, save_checkpoint

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    out = save_checkpoint(tmp_path / "run", 2, model, optimizer, scheduler, DataPosition(), {"loss": 1.0},
                          keep_last=0)
    assert (out / "adapter_model.safetensors").is_file()
    assert _modes(out) == _expected(out, umask)
