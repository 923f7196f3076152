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


@pytest.fixture(autouse=True)
def _modeling_llama_restored() -> Iterator[None]:
    """transformers' modeling_llama as it was before each test: a run in this process with liger's kernels (the
    default on CUDA, ``--kernels auto``) keeps liger's RoPE and class names in the module, as the trainer's own
    process does; the tests after it must see transformers' own."""
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    yield
    for name, value in before.items():
        if vars(modeling_llama).get(name) is not value:
            setattr(modeling_llama, name, value)


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


def whole_and_resumed(make_config: Callable, tmp_path: Path, steps: int, **settings) -> tuple[dict, dict]:
    """An uninterrupted run of ``steps`` steps beside one stopped at its checkpoint half way and resumed from
    it ("latest"): asserts the same loss at every step in both metrics.jsonl, and returns both runs' last
    checkpoint weights (for the caller to compare)."""
    from safetensors.torch import load_file

    from adapterd.trainer.loop import train

    settings = dict(save_steps=steps // 2, keep_last=0, **settings)
    whole = make_config(output=str(tmp_path / "whole"), max_steps=steps, **settings)
    train(whole)
    cut = make_config(output=str(tmp_path / "cut"), max_steps=steps // 2, **settings)
    train(cut)
    cut.max_steps, cut.resume = steps, "latest"
    train(cut)
    curves = [(Path(c.output) / "metrics.jsonl").read_text() for c in (whole, cut)]
    assert curves[0] == curves[1] and len(curves[0].splitlines()) == steps
    a, b = (load_file(Path(c.output) / f"checkpoint-{steps}" / "adapter_model.safetensors") for c in (whole, cut))
    return a, b
