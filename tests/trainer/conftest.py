"""Trainer fixtures: a config factory for the tiny model, one torch thread.

The machine has 2 shared cores: the tiny model trains fastest on one thread (two threads fight with
whatever else runs), and subprocesses get the same through ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import GITCLONE

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_config(tiny_model_dir: Path, tmp_path: Path) -> Callable:
    """TrainConfig for the tiny model with fast settings; keyword arguments override."""
    from adapterd.trainer.config import TrainConfig

    def make(**overrides):
        values = dict(base=str(tiny_model_dir), data=str(GITCLONE), method="lora",
                      output=str(tmp_path / "run"), quantization="none", batch_size=3, max_steps=20,
                      learning_rate=1e-2, save_steps=10, log_every=5, eval_split=0.0, lora_r=8,
                      lora_dropout=0.0, num_virtual_tokens=16, schedule="constant")
        values.update(overrides)
        return TrainConfig(**values)

    return make


def train_argv(cfg, *extra: str) -> list[str]:
    """The ``adapterd train`` command line for a config (only fields that differ from the defaults)."""
    import dataclasses

    argv = [sys.executable, "-m", "adapterd.cli", "train", "--no-progress"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "resume" or (value == f.default and f.name not in ("base", "data", "output")):
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv + list(extra)
