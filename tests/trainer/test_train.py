"""Training in-process on the tiny model (CPU): loss, checkpoints, status.json, stopping, the demo data."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest
import torch

from adapterd.trainer.checkpoint import NonFiniteAdapter, export_adapter, list_checkpoints
from adapterd.trainer.config import ConfigError
from adapterd.trainer.data import DataError, format_prompt
from adapterd.trainer.loop import train
from tests.helpers import reference_greedy
from tests.trainer.conftest import ALL_LINEAR


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def test_lora_run_writes_checkpoints_status_and_final_adapter(make_config, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = make_config(max_steps=25, save_steps=10, keep_last=2, lora_dropout=0.05)
    result = train(cfg)
    run = Path(cfg.output)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 26))
    assert losses[25] < 0.5 * losses[1]
    assert [s for s, _ in list_checkpoints(run)] == [20, 25]  # keep_last=2 dropped checkpoint-10
    assert not list(run.glob(".checkpoint-*"))

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" == result["state"]
    assert (status["step"], status["total_steps"], status["epoch"]) == (25, 25, 25.0)
    assert status["loss"] == pytest.approx(losses[25]) and status["smoothed_loss"] > status["loss"]
    assert status["tokens_per_second"] > 0 and status["elapsed_seconds"] > 0 and status["eta_seconds"] == 0
    assert status["last_checkpoint"].endswith("checkpoint-25") and status["error"] == ""
    assert "gpus" not in status  # no GPU here: absent, not zeros
    assert status["learning_rate"] == pytest.approx(1e-2)
    assert (run / "train.log").read_text().count("saved") == 3

    final = run / "final"
    # The adapter, and the tokenizer with the chat template its examples were formatted with (template.py).
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "adapter_config.json",
                                                       "adapter_model.safetensors", "chat_template.jinja",
                                                       "tokenizer.json", "tokenizer_config.json"]
    a = load_file(final / "adapter_model.safetensors")
    b = load_file(run / "checkpoint-25" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for ckpt in ("checkpoint-20", "final"):  # plain PEFT loads them
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run / ckpt)
        assert model.peft_config["default"].r == 8
    assert (run / "checkpoint-20" / "adapter_model.safetensors").stat().st_size < 1_000_000


@pytest.mark.parametrize("method, quantization", [("lora", "int8"), ("ptuning-v2", "none"),
                                                  ("ptuning-v2", "int8")])
def test_loss_falls(make_config, method, quantization):
    lr = 3e-2 if method == "ptuning-v2" else 1e-2
    cfg = make_config(method=method, quantization=quantization, max_steps=15, save_steps=100, learning_rate=lr)
    train(cfg)
    losses = _losses(Path(cfg.output))
    assert sum(losses[s] for s in (13, 14, 15)) / 3 < 0.7 * losses[1], losses


def test_prefix_forward_matches_peft_and_checkpointing(make_config, tiny_model_dir):
    """Our prefix forward gives PEFT's own loss (where PEFT's forward still passes the prefix), the prefix
    changes the loss, and gradient checkpointing changes nothing."""
    from adapterd.trainer import model as model_mod

    cfg = make_config(method="ptuning-v2", num_virtual_tokens=5)
    base = model_mod.load_base(cfg, torch.device("cpu"))
    peft_model = model_mod.make_peft_model(base, cfg)
    ids = torch.randint(10, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ours, cache = model_mod.forward_loss(peft_model, batch, cfg)
    assert all(layer.prefix_reads == 1 for layer in cache.layers)
    with torch.no_grad():
        plain = base(**batch).loss
    assert abs(ours.item() - plain.item()) > 1e-3  # the prefix is used
    with warnings.catch_warnings():  # 5.24: PEFT passes `past_key_values`, deprecated there but still read
        warnings.simplefilter("ignore", FutureWarning)
        peft_loss = peft_model(**batch).loss
    torch.testing.assert_close(ours, peft_loss)

    ours.backward()
    grad = next(p for p in peft_model.parameters() if p.requires_grad).grad.clone()
    peft_model.zero_grad()
    model_mod.enable_checkpointing(peft_model, model_mod.TrainConfig(**{**vars(cfg), "gradient_checkpointing": "on"}))
    assert model_mod.check_prefix_reaches_layers(peft_model, cfg, torch.device("cpu"))
    again, _ = model_mod.forward_loss(peft_model, batch, cfg)
    again.backward()
    torch.testing.assert_close(again, ours)
    torch.testing.assert_close(next(p for p in peft_model.parameters() if p.requires_grad).grad, grad)


def test_int8_dequant_matches_bitsandbytes_closely(make_config):
    """The training-time int8 path (dequantize, then a plain matmul) stays within bitsandbytes' own
    activation-quantization noise of its int8 matmul."""
    from adapterd.trainer import model as model_mod

    cfg = make_config(quantization="int8")
    base = model_mod.load_base(cfg, torch.device("cpu"))
    ids = torch.randint(10, 200, (2, 12))
    with torch.no_grad():
        bnb_logits = base(input_ids=ids).logits
        assert model_mod.use_dequant_int8(base) == 14
        ours = base(input_ids=ids).logits
    assert (ours - bnb_logits).abs().max() < 0.05 * bnb_logits.abs().max()


@pytest.mark.parametrize("method, quantization, steps, lr, virtual", [
    ("lora", "none", 60, 1e-2, 0), ("lora", "int8", 60, 1e-2, 0), ("ptuning-v2", "none", 250, 3e-2, 64),
    ("ptuning-v2", "int8", 300, 5e-2, 16)])
def test_demo_data_is_memorized(make_config, tiny_model_dir, gitclone_data, tmp_path, method, quantization, steps,
                                lr, virtual):
    """After training on the tutorial's three examples the adapter answers each question greedily with its
    trained answer: through plain transformers + PEFT, and served by the daemon on the same base."""
    from transformers import AutoTokenizer

    from adapterd.clients import AdapterdClient
    from tests.server.conftest import ENGINE_IN_TEST_PROCESS, start_daemon

    cfg = make_config(method=method, quantization=quantization, max_steps=steps, learning_rate=lr, lora_r=16,
                      lora_target_modules=ALL_LINEAR, num_virtual_tokens=virtual or 16, save_steps=1000,
                      export_adapter=str(tmp_path / "root" / "trained"))
    train(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = json.loads(gitclone_data.read_text(encoding="utf-8"))
    for record in records:
        want = tok(record["output"], add_special_tokens=False)["input_ids"]
        got = reference_greedy(tiny_model_dir, format_prompt(record["instruction"]), Path(cfg.output) / "final",
                               len(want), quantization=quantization)
        assert tok.decode(got) == record["output"], record["instruction"]
    daemon = start_daemon(tiny_model_dir, tmp_path / "root", quantization=quantization, **ENGINE_IN_TEST_PROCESS)
    try:
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=120) as client:
            for record in records:
                reply = client.generate(format_prompt(record["instruction"]), "trained", max_new_tokens=40)
                assert reply.text == record["output"], record["instruction"]
    finally:
        daemon.stop()


def test_stop_before_the_first_step_and_stop_file(make_config):
    """A stop that arrives while the model loads ends the run at step 0; a STOP file works like SIGTERM."""
    stop = threading.Event()
    stop.set()
    cfg = make_config(max_steps=1000, save_steps=500)
    result = train(cfg, stop=stop)
    assert result["state"] == "stopped" and result["step"] == 0 and not list_checkpoints(Path(cfg.output))
    run2 = Path(cfg.output).with_name("run2")
    run2.mkdir()
    (run2 / "STOP").write_text("")
    assert train(make_config(max_steps=1000, output=str(run2)))["state"] == "stopped"
    assert not (run2 / "STOP").exists()  # consumed once honoured


def test_stop_mid_run_writes_checkpoint(make_config, monkeypatch):
    from adapterd.trainer import loop

    stop = threading.Event()
    real = loop.StatusWriter.record_step

    def record(self, step, loss, tokens):
        real(self, step, loss, tokens)
        if step == 7:
            stop.set()

    monkeypatch.setattr(loop.StatusWriter, "record_step", record)
    cfg = make_config(max_steps=1000, save_steps=500)
    result = train(cfg, stop=stop)
    status = json.loads((Path(cfg.output) / "status.json").read_text())
    assert result["state"] == status["state"] == "stopped" and status["step"] == 7
    assert [s for s, _ in list_checkpoints(Path(cfg.output))] == [7]
    assert status["last_checkpoint"].endswith("checkpoint-7")


def test_malformed_data_fails_with_its_index(make_config, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    cfg = make_config(data=str(data))
    with pytest.raises(DataError, match="record 1, field 'output': is missing"):
        train(cfg)
    status = json.loads((Path(cfg.output) / "status.json").read_text())
    assert status["state"] == "failed" and "record 1, field 'output'" in status["error"]
    skipped = make_config(data=str(data), skip_malformed=True, max_steps=2,
                          output=str(tmp_path / "skipping"))
    assert train(skipped)["skipped_records"] == 1
    assert "skipped record 1, field 'output'" in (tmp_path / "skipping" / "train.log").read_text()


def test_export_adapter(make_config, tmp_path):
    target = tmp_path / "adapters" / "team" / "gitclone"
    cfg = make_config(max_steps=3, export_adapter=str(target))
    assert train(cfg)["exported_to"] == str(target)
    assert (target / "adapter_model.safetensors").is_file() and not (target / "trainer_state.pt").exists()
    with pytest.raises(ConfigError, match="export_adapter: already exists"):
        make_config(max_steps=3, export_adapter=str(target), output=str(tmp_path / "again")).validate()


def test_a_run_whose_loss_turns_non_finite_fails_and_exports_nothing(make_config, tmp_path, monkeypatch):
    """Divergence (here: the second step's loss is NaN, as an overflowing forward gives) fails the run naming
    the step, before the optimizer writes NaN into the adapter: no checkpoint, no export."""
    from adapterd.trainer import model as model_mod

    real, calls = model_mod.forward_loss, []

    def diverging(*args, **kwargs):
        loss, extra = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), extra

    monkeypatch.setattr(model_mod, "forward_loss", diverging)
    target = tmp_path / "adapters" / "poisoned"
    cfg = make_config(max_steps=3, save_steps=1, export_adapter=str(target))
    with pytest.raises(NonFiniteAdapter, match="loss is nan at step 2"):
        train(cfg)
    status = json.loads((Path(cfg.output) / "status.json").read_text())
    assert status["state"] == "failed" and "NonFiniteAdapter" in status["error"]
    assert not target.exists() and [n for n, _ in list_checkpoints(Path(cfg.output))] == [1]


def test_export_refuses_a_checkpoint_holding_nan(make_config, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = make_config(max_steps=1)
    train(cfg)
    (_, checkpoint), = list_checkpoints(Path(cfg.output))
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(checkpoint / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteAdapter, match=name.replace(".", r"\.")):
        export_adapter(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
