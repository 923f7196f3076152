"""A run killed with SIGKILL mid-way resumes from its last checkpoint and ends where an uninterrupted run
ends: the same loss at every step and the same final adapter weights (CPU, fp32, same seed)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterd.trainer.checkpoint import list_checkpoints
from adapterd.trainer.loop import train
from tests.trainer.conftest import train_argv, whole_and_resumed


def _curve(run_dir: Path) -> dict[int, float]:
    """Loss per step; each step is in metrics.jsonl once, also after a resume that redid steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    return {row["step"]: row["loss"] for row in rows}


def _weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _assert_same_run(a: Path, b: Path) -> None:
    assert _curve(a) == _curve(b)
    wa, wb = _weights(a / "final"), _weights(b / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_resume_matches_uninterrupted(make_config, tmp_path, subprocess_env):
    # Two micro-batches per epoch (3 records, batch 2), dropout on, warm-up then linear decay: the resume
    # must restore the data position inside an epoch, the RNG, the optimizer and the scheduler.
    settings = dict(max_steps=300, save_steps=40, batch_size=2, lora_dropout=0.1, warmup_steps=5,
                    schedule="linear", learning_rate=5e-3, keep_last=0, log_every=50)
    reference = make_config(output=str(tmp_path / "reference"), **settings)
    train(reference)

    killed = make_config(output=str(tmp_path / "killed"), **settings)
    run = Path(killed.output)
    proc = subprocess.Popen(train_argv(killed), env=subprocess_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = json.loads((run / "status.json").read_text()).get("step", 0)
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if step >= 130:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "running" and 130 <= status["step"] < 300
    done = [s for s, _ in list_checkpoints(run)]
    assert done and done[-1] <= status["step"] and not (run / "final").exists()

    # The saved train_config.json supplies every option left out.
    resume_argv = [*train_argv(killed)[:5], "--output", str(run), "--resume"]
    resumed = subprocess.run(resume_argv, env=subprocess_env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    log = (run / "train.log").read_text()
    assert f"resumed from {run / f'checkpoint-{done[-1]}'} at step {done[-1]}" in log
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    _assert_same_run(Path(reference.output), run)

    # --resume checkpoint-N from an older checkpoint (in-process) also lands on the same result.
    older = tmp_path / "older"
    shutil.copytree(run, older)
    shutil.rmtree(older / "final")
    train(make_config(output=str(older), resume="checkpoint-40", **settings))
    _assert_same_run(Path(reference.output), older)


def test_ptuning_v2_resume_is_exact(make_config, tmp_path):
    """P-Tuning v2 stopped at a checkpoint and resumed ends as an uninterrupted run: the same loss at every
    step and the same prefix, bit for bit. (PEFT lists the prefix's ``prompt_embeddings`` among the unexpected
    keys of the state dict it has just loaded; the resume refused every P-Tuning checkpoint for it.)"""
    a, b = whole_and_resumed(make_config, tmp_path, 10, method="ptuning-v2", batch_size=2)
    assert list(a) == ["prompt_embeddings"] and torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
