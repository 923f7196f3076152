"""Resuming reads a checkpoint's adapter through the daemon's one reader (``peft_format``), so a checkpoint
the daemon would refuse (weights holding NaN, written by an older version) is refused on resume too, naming
the tensor, instead of training on from NaN. The refusal failed on 6e7cc76, which read the file directly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterd.server.errors import FailedPrecondition
from adapterd.trainer.checkpoint import load_adapter_weights

WEIGHTS = "adapter_model.safetensors"


def _fresh(tiny_model_dir, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_checkpoint_is_restored_and_one_holding_nan_is_refused(tiny_model_dir, tmp_path):
    saved = _fresh(tiny_model_dir, seed=1)
    saved.save_pretrained(tmp_path / "ckpt")
    restored = _fresh(tiny_model_dir, seed=2)
    load_adapter_weights(restored, tmp_path / "ckpt")
    want, got = _lora(saved), _lora(restored)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    weights = load_file(tmp_path / "ckpt" / WEIGHTS)
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, tmp_path / "ckpt" / WEIGHTS)
    with pytest.raises(FailedPrecondition, match="NaN"):
        load_adapter_weights(_fresh(tiny_model_dir, seed=3), tmp_path / "ckpt")
