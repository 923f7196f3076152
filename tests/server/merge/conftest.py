"""Fixtures for the merge tests: a private copy of the adapter root (merges write into it), extra adapters
of matching and mismatched ranks, a sharded copy of the tiny model, and a Merger over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import make_lora_adapter


@pytest.fixture(scope="session")
def merge_root(tmp_path_factory, tiny_model_dir, adapter_root) -> Path:
    """The shared adapter root copied (merges add adapters; the shared one stays as other tests expect),
    plus "lora-qvo8" (r 8, same rank as "lora-qv") and "lora-rs8" (rsLoRA r 8)."""
    root = tmp_path_factory.mktemp("merge-root") / "adapters"
    shutil.copytree(adapter_root, root)
    make_lora_adapter(tiny_model_dir, root / "lora-qvo8", r=8, alpha=8, targets=["q_proj", "v_proj", "o_proj"],
                      seed=11)
    make_lora_adapter(tiny_model_dir, root / "lora-rs8", r=8, alpha=16, targets=["q_proj", "up_proj"],
                      seed=12, use_rslora=True)
    return root


@pytest.fixture(scope="session")
def sharded_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model re-saved by ``save_pretrained`` in several shards with an index."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture
def merger(tiny_model_dir, merge_root):
    from adapterd.server.merge import Merger

    return Merger(tiny_model_dir, merge_root, max_shard_bytes=300_000)


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary/old directories the merger may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
