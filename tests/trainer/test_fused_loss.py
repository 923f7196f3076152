"""The fused linear + cross-entropy (trainer/fused_loss.py): the same loss and gradients as the plain path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapterd.trainer import model as model_mod
from adapterd.trainer.config import ConfigError
from adapterd.trainer.fused_loss import chunked_linear_ce, make_head
from tests.helpers import TEST_DEVICE
from tests.trainer.conftest import whole_and_resumed


def _leaves(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_cross_entropy(chunk, with_bias):
    """Loss and the gradients of input, weight and bias against F.cross_entropy on full logits, for chunks
    that divide the rows, do not, are one row, and exceed them; the upstream gradient (a micro-batch's
    1/n scale) is applied."""
    x, w, b = _leaves((40, 16), (50, 16), (50,))
    target = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    bias = b if with_bias else None
    ours = chunked_linear_ce(x, w, bias, target, chunk)
    (ours * 0.25).backward()
    got = [t.grad.clone() for t in (x, w, b) if t.grad is not None]
    for t in (x, w, b):
        t.grad = None
    plain = F.cross_entropy(F.linear(x, w, bias), target)
    (plain * 0.25).backward()
    want = [t.grad for t in (x, w, b) if t.grad is not None]
    assert torch.allclose(ours, plain, rtol=1e-6)
    assert len(got) == len(want) == (3 if with_bias else 2)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_frozen_weight_gets_no_gradient():
    """The LM head is frozen in LoRA and prefix training: no [V, H] gradient is made for it."""
    x, = _leaves((9, 8))
    w = torch.randn(30, 8)
    chunked_linear_ce(x, w, None, torch.arange(9), 4).backward()
    assert x.grad is not None and w.grad is None


def _peft(tiny_model_dir: Path, make_config, method: str):
    cfg = make_config(method=method, lora_dropout=0.0, fused_loss="torch")
    base = model_mod.load_base(cfg, torch.device(TEST_DEVICE))
    return model_mod.make_peft_model(base, cfg), cfg


def _prompt_masked_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows whose first tokens (a prompt) are masked, as the trainer's batches are."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return {k: v.to(TEST_DEVICE) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


@pytest.mark.parametrize("method", ["lora", "ptuning-v2"])
def test_head_matches_the_models_own_loss(tiny_model_dir, make_config, monkeypatch, method):
    """Through ``forward_loss``: the fused head's loss and the adapter's gradients equal the model's own
    (prompt and pads masked, labels shifted by one), for LoRA and for the prefix path. In fp32 on CUDA too
    (the trainer's bf16 there is patched out; TF32 matmuls are off by default): in bf16 the plain path's
    logits are rounded to bf16 before the fp32 softmax and the fused head's are not, which moved 98% of the
    gradient elements past these bounds on the H200 while the math was the same. This test judges the math."""
    monkeypatch.setattr(model_mod, "compute_dtype", lambda device: torch.float32)
    peft_model, cfg = _peft(tiny_model_dir, make_config, method)
    assert peft_model.get_base_model().dtype == torch.float32
    head, name = model_mod.loss_head(peft_model, cfg, torch.device(TEST_DEVICE))
    assert name == "torch" and head is not None
    batch = _prompt_masked_batch(peft_model.config.vocab_size)
    results = []
    for h in (None, head):
        loss, _ = model_mod.forward_loss(peft_model, batch, cfg, h)
        loss.backward()
        grads = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
        peft_model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    assert len(fused_grads) == len(plain_grads) > 0
    for g, ref in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_a_head_with_transformed_logits_is_refused(tiny_model_dir, make_config):
    """A family whose logits are not lm_head(hidden) (Gemma's soft-cap) would train on another loss:
    refused, naming --fused-loss."""
    peft_model, cfg = _peft(tiny_model_dir, make_config, "lora")
    peft_model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="fused_loss: the model's logits are transformed"):
        model_mod.loss_head(peft_model, cfg, torch.device(TEST_DEVICE))


def test_auto_is_off_on_the_cpu(tiny_model_dir, make_config, caplog):
    """The default, ``auto``, keeps the model's own loss off CUDA (so CPU runs are as before), saying so."""
    import logging

    peft_model, cfg = _peft(tiny_model_dir, make_config, "lora")
    cfg.fused_loss = "auto"
    caplog.set_level(logging.INFO, logger="adapterd.trainer")
    assert model_mod.loss_head(peft_model, cfg, torch.device("cpu")) == (None, "plain")
    assert "fused loss: off (auto: the run is on cpu" in caplog.text


def test_liger_without_cuda_is_refused(tiny_model_dir, make_config):
    peft_model, _ = _peft(tiny_model_dir, make_config, "lora")
    with pytest.raises(ConfigError, match="fused_loss: liger: liger-kernel does not import here"):
        make_head(peft_model.get_base_model(), torch.device("cpu"), "liger")


@pytest.mark.gpu
def test_liger_matches_the_models_own_loss_on_cuda(make_config):
    """On the GPU with liger-kernel installed: liger's head against the plain bf16 loss (relative 1e-2: bf16
    logits in other tiles), and its gradient on the hidden states."""
    pytest.importorskip("liger_kernel")
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 64, 256, generator=gen).to(device, torch.bfloat16).requires_grad_()
    lm_head = torch.nn.Linear(256, 4000, bias=False).to(device, torch.bfloat16)
    labels = torch.randint(0, 4000, (2, 64), generator=gen).to(device)
    labels[:, :10] = -100
    base = type("Base", (), {"get_output_embeddings": lambda self: lm_head})()
    head, name = make_head(base, device, "liger")
    assert name == "liger"
    fused = head(hidden, labels)
    fused.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    logits = lm_head(hidden).float()
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 4000), labels[:, 1:].reshape(-1), ignore_index=-100)
    plain.backward()
    torch.testing.assert_close(fused.float(), plain, rtol=1e-2, atol=0)
    torch.testing.assert_close(grad.float(), hidden.grad.float(), rtol=5e-2, atol=1e-3)


def test_resume_with_the_fused_loss_is_exact(make_config, tmp_path):
    """A run with the fused loss stopped at a checkpoint and resumed ends as an uninterrupted one: the same
    loss at every step and the same adapter weights, bit for bit (dropout on, two micro-batches an epoch)."""
    a, b = whole_and_resumed(make_config, tmp_path, 12, fused_loss="torch", batch_size=2, lora_dropout=0.1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_falls_back_to_torch_when_liger_fails(tiny_model_dir, make_config, monkeypatch, caplog):
    """``--fused-loss auto`` where liger-kernel imports but its kernel fails on the probe batch (Triton cannot
    compile its launcher, say): the torch head, with a warning saying why; ``liger`` asked for by name fails."""
    from adapterd.trainer import fused_loss

    def broken_liger(base, device, backend):
        if backend == "torch":
            return real(base, device, backend)

        def head(hidden, labels):
            raise RuntimeError("triton: failed to compile the launcher")
        return head, "liger"

    real = fused_loss.make_head
    monkeypatch.setattr(fused_loss, "make_head", broken_liger)
    monkeypatch.setattr(fused_loss, "auto_off", lambda device: None)  # as on CUDA, where auto takes a head
    peft_model, cfg = _peft(tiny_model_dir, make_config, "lora")
    cfg.fused_loss = "auto"
    head, name = model_mod.loss_head(peft_model, cfg, torch.device(TEST_DEVICE))
    assert name == "torch" and head is not None
    assert "liger-kernel failed on a probe batch (RuntimeError: triton: failed to compile" in caplog.text
    cfg.fused_loss = "liger"
    with pytest.raises(RuntimeError, match="failed to compile"):
        model_mod.loss_head(peft_model, cfg, torch.device(TEST_DEVICE))
