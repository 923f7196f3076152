"""``--kernels`` (trainer/kernels.py): liger-kernel's RMSNorm, RoPE and SwiGLU patched into the base, kept only
where a probe batch gives the plain model's loss. On the CPU the probe and its undo are exercised with stand-in
patches (liger's own kernels are Triton, CUDA only); the GPU tests train with the real ones."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from adapterd.trainer import kernels
from adapterd.trainer import model as model_mod
from adapterd.trainer.config import ConfigError
from tests.helpers import TEST_DEVICE
from tests.trainer.conftest import train_argv

CPU = torch.device("cpu")
# Two command-line tests are about a machine without CUDA (CI, the CPU machine): where a GPU is there liger really
# runs, which tests/trainer's GPU tests and bench/gpu_train.sh check instead.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA: here liger "
                              "would really run (the GPU tests below cover that)")


def _curve(run_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@cpu_only
def test_cli_liger_without_cuda_exits_2_naming_the_flag(make_config, subprocess_env):
    """``adapterd train --kernels liger`` on the CPU: one line naming --kernels and why, exit 2, no traceback."""
    cfg = make_config(kernels="liger", max_steps=2)
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "--kernels" in line]
    assert len(lines) == 1 and lines[0] == out.stderr.strip().splitlines()[-1], out.stderr
    assert lines[0].startswith("adapterd train: --kernels: liger: liger-kernel's Triton kernels need a CUDA "
                               "device, and this run is on cpu; train with --kernels off"), lines[0]


@cpu_only
@pytest.mark.slow
def test_cli_auto_on_cpu_trains_exactly_as_off(make_config, subprocess_env):
    """``--kernels auto`` on the CPU: off, said once in train.log, and the same loss at every step as
    ``--kernels off`` (bit for bit: nothing was patched)."""
    from adapterd.trainer.loop import train

    off = make_config(kernels="off", max_steps=4)
    train(off)
    auto = make_config(kernels="auto", max_steps=4, output=off.output + "-auto")
    out = subprocess.run(train_argv(auto), env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (Path(auto.output) / "train.log").read_text()
    assert log.count("kernels: ") == 1 and "kernels: off (auto: liger-kernel's Triton kernels need a CUDA" in log
    assert _curve(auto.output) == _curve(off.output) and len(_curve(off.output)) == 4


# ------------------------------------------------------------------ the probe, with stand-ins for liger


def _peft(make_config, method: str, **overrides):
    cfg = make_config(method=method, lora_dropout=0.1, **overrides)
    base = model_mod.load_base(cfg, CPU)
    return model_mod.make_peft_model(base, cfg), cfg


def _modeling(peft_model):
    return sys.modules[type(peft_model.get_base_model()).__module__]


def _rms_norm_forward(self, x):
    """An equivalent RMSNorm in torch (what liger's kernel computes, without Triton)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


def _stand_in(wrong_rope: bool = False, fails: bool = False):
    """A stand-in for ``kernels.liger_apply``, patching like liger: bound forwards on the norms, a module
    global for RoPE (no rotation at all when ``wrong_rope``; raising, as a kernel that fails to compile,
    when ``fails``)."""
    def apply(model_type, parts=kernels.PARTS):
        def patch_model(model):
            modeling = sys.modules[type(model).__module__]
            original = modeling.apply_rotary_pos_emb

            def rope(q, k, cos, sin, *args, **kwargs):
                if fails:
                    raise RuntimeError("triton: failed to compile the launcher")
                return (q, k) if wrong_rope else original(q, k, cos, sin, *args, **kwargs)

            modeling.apply_rotary_pos_emb = rope
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.__dict__["forward"] = types.MethodType(_rms_norm_forward, module)
        return patch_model
    return apply


_ROPE = None


@pytest.fixture(autouse=True)
def _modeling_llama_restored():
    """transformers' modeling_llama as it was before each test: a kept patch (liger's RoPE, its class names)
    stays for the rest of the trainer's process, but this process goes on to other tests."""
    global _ROPE
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    _ROPE = before["apply_rotary_pos_emb"]
    yield
    for name, value in before.items():
        if vars(modeling_llama).get(name) is not value:
            setattr(modeling_llama, name, value)


@pytest.fixture
def liger_here(monkeypatch):
    """As if on CUDA with liger-kernel installed: ``unavailable`` finds nothing wrong."""
    monkeypatch.setattr(kernels, "unavailable", lambda base, device: None)
    return monkeypatch


@pytest.mark.parametrize("method", ["lora", "ptuning-v2"])
def test_matching_kernels_are_kept(make_config, liger_here, caplog, method):
    """Kernels that compute what the model computes pass the probe (through the prefix for P-Tuning v2): kept,
    with the probe's figures in the log line; the loss is unchanged."""
    liger_here.setattr(kernels, "liger_apply", _stand_in())
    peft_model, cfg = _peft(make_config, method, kernels="liger")
    plain = model_mod._probe_kernels(peft_model, cfg, CPU)[0]
    caplog.set_level(logging.INFO, logger="adapterd.trainer")
    try:
        assert model_mod.training_kernels(peft_model, cfg, CPU) == "liger"
        assert peft_model.training  # the probe puts the mode back
        assert model_mod._probe_kernels(peft_model, cfg, CPU)[0] == pytest.approx(plain, rel=1e-6)
        assert "kernels: liger (RMSNorm, RoPE, SwiGLU; 5 modules patched; probe loss" in caplog.text
    finally:
        _modeling(peft_model).apply_rotary_pos_emb = _ROPE  # a kept patch stays: the trainer's process ends


@pytest.mark.parametrize("method", ["lora", "ptuning-v2"])
def test_kernels_that_differ_are_refused_and_undone(make_config, liger_here, caplog, method):
    """RoPE that does not rotate: ``liger`` refuses naming kernels and the probe's figures; ``auto`` warns and
    trains without; either way the model and the modeling module are as before, to the bit."""
    liger_here.setattr(kernels, "liger_apply", _stand_in(wrong_rope=True))
    peft_model, cfg = _peft(make_config, method, kernels="liger")
    plain = model_mod._probe_kernels(peft_model, cfg, CPU)
    with pytest.raises(ConfigError, match=r"kernels: liger: the (loss|hidden states) with the kernels differs? .*"
                                          r"probe loss .*; train with --kernels off"):
        model_mod.training_kernels(peft_model, cfg, CPU)
    assert _modeling(peft_model).apply_rotary_pos_emb is _ROPE
    assert not any("forward" in m.__dict__ for m in peft_model.get_base_model().modules()
                   if type(m).__name__.endswith("RMSNorm"))
    cfg.kernels = "auto"
    assert model_mod.training_kernels(peft_model, cfg, CPU) == "off"
    assert "kernels: off (auto: the " in caplog.text
    after = model_mod._probe_kernels(peft_model, cfg, CPU)
    assert after[0] == plain[0] and torch.equal(after[1], plain[1])


def test_a_kernel_that_fails_on_the_probe(make_config, liger_here, caplog):
    """A kernel raising on the probe batch (Triton cannot compile here): ``auto`` goes on without, saying why;
    ``liger`` asked for by name fails with the kernel's error. Undone both times."""
    liger_here.setattr(kernels, "liger_apply", _stand_in(fails=True))
    peft_model, cfg = _peft(make_config, "lora", kernels="auto")
    assert model_mod.training_kernels(peft_model, cfg, CPU) == "off"
    assert "kernels: off (liger-kernel failed on a probe batch: RuntimeError: triton: failed" in caplog.text
    cfg.kernels = "liger"
    with pytest.raises(RuntimeError, match="failed to compile"):
        model_mod.training_kernels(peft_model, cfg, CPU)
    assert _modeling(peft_model).apply_rotary_pos_emb is _ROPE


def test_an_unsupported_model_type(make_config, caplog):
    """A model type liger's patch was not read for here: ``liger`` is a ConfigError naming it, ``auto`` logs
    and stays off (checked as on CUDA: the type is looked at before anything runs)."""
    peft_model, cfg = _peft(make_config, "lora", kernels="liger")
    peft_model.get_base_model().config.model_type = "gemma2"
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="kernels: liger: model type 'gemma2' is not one that is patched "
                                          r"\(supported: llama, mistral, qwen2, qwen3\)"):
        model_mod.training_kernels(peft_model, cfg, cuda)
    cfg.kernels = "auto"
    caplog.set_level(logging.INFO, logger="adapterd.trainer")
    assert model_mod.training_kernels(peft_model, cfg, cuda) == "off"
    assert "kernels: off (auto: model type 'gemma2'" in caplog.text


def test_off_touches_nothing(make_config, monkeypatch):
    monkeypatch.setattr(kernels, "unavailable", lambda base, device: pytest.fail("looked for liger"))
    peft_model, cfg = _peft(make_config, "lora", kernels="off")
    assert cfg.kernels == "off" and model_mod.training_kernels(peft_model, cfg, CPU) == "off"


def test_liger_patch_and_undo_where_it_imports(make_config):
    """liger-kernel's own instance patch (no kernel runs: patching alone works on the CPU), where it is
    installed: the norms and MLPs of every layer get its forwards, RoPE its function; the undo restores all."""
    pytest.importorskip("liger_kernel.transformers.monkey_patch")
    peft_model, _ = _peft(make_config, "lora", lora_target_modules="q_proj,v_proj,gate_proj,up_proj")
    base = peft_model.get_base_model()
    modeling = _modeling(peft_model)
    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    before = {n: getattr(modeling, n) for n in names}
    undo, count = kernels.patch(base)
    try:
        assert count == 3 * base.config.num_hidden_layers + 1
        assert modeling.apply_rotary_pos_emb.__module__ == "liger_kernel.transformers.rope"
        mlp = base.model.layers[0].mlp
        assert mlp.forward.__func__.__qualname__ == "LigerSwiGLUMLP.forward"
        assert type(mlp.gate_proj).__name__ == "Linear" and hasattr(mlp.gate_proj, "lora_A")  # LoRA kept
    finally:
        undo()
    assert {n: getattr(modeling, n) for n in names} == before
    assert not any("forward" in m.__dict__ for m in base.modules())


# ------------------------------------------------------------------------------------ on the GPU

@pytest.mark.gpu
@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="runs with ADAPTERD_TEST_DEVICE=cuda (bench/gpu_train.sh tests)")
@pytest.mark.parametrize("method", ["lora", "ptuning-v2"])
def test_liger_kernels_train_as_the_plain_model_on_cuda(make_config, method):
    """On the GPU with liger-kernel: the tiny model on an int8 base (dequant compute, non-reentrant gradient
    checkpointing), LoRA and P-Tuning v2, 6 steps with ``--kernels liger`` against ``--kernels off``: every
    step's loss within 2e-2 relative (bf16: the probe's 1e-2 per forward, plus the drift of 6 updates)."""
    pytest.importorskip("liger_kernel")
    from adapterd.trainer.loop import train

    settings = dict(method=method, quantization="int8", int8_compute="dequant", gradient_checkpointing="on",
                    max_steps=6, learning_rate=1e-3, lora_dropout=0.0)
    off = make_config(**settings)
    train(off)
    on = make_config(kernels="liger", output=off.output + "-liger", **settings)
    train(on)
    assert "kernels: liger (RMSNorm, RoPE, SwiGLU" in (Path(on.output) / "train.log").read_text()
    plain, patched = _curve(off.output), _curve(on.output)
    assert len(plain) == len(patched) == 6
    for a, b in zip(plain, patched, strict=True):
        assert b == pytest.approx(a, rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="runs with ADAPTERD_TEST_DEVICE=cuda (bench/gpu_train.sh tests)")
@pytest.mark.parametrize("method", ["lora", "ptuning-v2"])
def test_resume_at_the_gpu_defaults_is_exact(make_config, tmp_path, method):
    """Issue 20's "resume stays exact" where liger runs: the int8 base with ``--fused-loss auto`` and ``--kernels
    auto`` (liger's loss and kernels, as on every CUDA run), dropout on, stopped at its checkpoint half way and
    resumed, ends as an uninterrupted run: the same loss at every step and the same adapter weights, bit for bit."""
    pytest.importorskip("liger_kernel")
    from tests.trainer.conftest import whole_and_resumed

    a, b = whole_and_resumed(make_config, tmp_path, 12, method=method, quantization="int8", fused_loss="auto",
                             kernels="auto", batch_size=2, lora_dropout=0.1, learning_rate=1e-3)
    said = (tmp_path / "cut" / "train.log").read_text()
    assert "kernels: liger (RMSNorm, RoPE, SwiGLU" in said and "loss: liger" in said
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
