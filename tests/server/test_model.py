"""The one base-model loader (``server/model.py``), which the daemon and the trainer share.

The two loaders it replaces disagreed: nf4 without double quantization when serving but with it when
training (an adapter trained on one set of nf4 weights was served on another), bf16 for serving on a GPU
without bf16 where the trainer chose fp16, a GPU base loaded onto the CPU then moved when serving but
placed directly when training, and two ``pick_device`` (the daemon's ignored LOCAL_RANK and kept a bare
"cuda" without its index; the trainer's took no request). Each test below failed on that code.
"""

from __future__ import annotations

import pytest
import torch

from adapterd.server.model import load_base_model, pick_device
from adapterd.trainer.config import TrainConfig
from adapterd.trainer.model import load_base


class _Loaded(Exception):
    """Raised by the stand-in for ``from_pretrained`` once it has seen its arguments."""


@pytest.fixture
def a_gpu_without_bf16(monkeypatch):
    """What the loaders ask ``from_pretrained`` for, on a (pretended) GPU without bf16 (a V100, a T4):
    every call's keyword arguments, the quantization config as a dict."""
    from transformers import AutoModelForCausalLM

    calls: list[dict] = []

    def record(path, **kwargs):
        qconfig = kwargs.pop("quantization_config", None)
        calls.append({**kwargs, "quantization_config": qconfig.to_dict() if qconfig is not None else None})
        raise _Loaded
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    return calls


@pytest.mark.parametrize("quantization", ["int8", "nf4", "none"])
def test_the_daemon_and_the_trainer_load_a_base_alike(a_gpu_without_bf16, tiny_model_dir, quantization):
    with pytest.raises(_Loaded):
        load_base_model(tiny_model_dir, quantization, device="cuda:0")
    with pytest.raises(_Loaded):
        load_base(TrainConfig(base=str(tiny_model_dir), quantization=quantization), torch.device("cuda", 0))
    served, trained = a_gpu_without_bf16
    assert served == trained
    assert served["dtype"] == torch.float16 and served["device_map"] == {"": 0}
    if quantization == "nf4":
        assert served["quantization_config"]["bnb_4bit_use_double_quant"]
        assert served["quantization_config"]["bnb_4bit_compute_dtype"] == "float16"


def test_one_device_choice_with_one_meaning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this host
    assert pick_device() == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 1)  # with its index: equal to its tensors' device
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
