"""``adapterd demo`` as a user runs it, on a directory where its slow steps are already done (the tiny model
and two PEFT-made adapters under the demo's names: the demo reuses them, as on a second run): it serves them,
answers with each adapter and with none as PEFT does, and stops the daemon; a training that fails stops the
demo naming the failure and its output, and leaves no process behind. The training recipes themselves are
checked in tests/trainer/test_train.py (test_demo_data_is_memorized)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from adapterd.cli.demo import QUESTION
from adapterd.trainer.data import format_prompt
from tests.helpers import make_lora_adapter, make_prefix_adapter, reference_greedy

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
ADAPTERS = {"gitclone-lora": make_lora_adapter, "gitclone-ptuning": make_prefix_adapter}


def _demo(work, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterd.cli", "demo", "--dir", str(work), *extra], env=ENV,
                          capture_output=True, text=True, timeout=300)


def _prepared(tmp_path, tiny_model_dir):
    work = tmp_path / "demo"
    shutil.copytree(tiny_model_dir, work / "tiny-model")
    for seed, (name, make) in enumerate(ADAPTERS.items(), start=1):
        make(tiny_model_dir, work / "adapters" / name, seed=seed)
    return work


@pytest.mark.slow  # ~10 s: the demo, its daemon and the PEFT references each load torch
def test_demo_serves_each_adapter_as_peft_does(tmp_path, tiny_model_dir):
    work = _prepared(tmp_path, tiny_model_dir)
    out = _demo(work, "--quantization", "none")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    answers = dict(re.findall(r"^\[([^\]]+)\] ('.*'|\".*\") \(\d+ tokens\)$", out.stdout, re.M))
    assert set(answers) == {*ADAPTERS, "base model"}, out.stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = format_prompt(QUESTION)
    for name, text in answers.items():
        adapter = work / "adapters" / name if name in ADAPTERS else None
        assert ast.literal_eval(text) == tok.decode(reference_greedy(tiny_model_dir, prompt, adapter, 40)), name
    assert "already trained" in out.stdout and "daemon exited with 0" in out.stdout


@pytest.mark.slow  # ~10 s: three processes that load torch
def test_a_failed_training_stops_the_demo_and_every_process(tmp_path, tiny_model_dir):
    work = _prepared(tmp_path, tiny_model_dir)
    shutil.rmtree(work / "adapters" / "gitclone-lora")
    (work / "runs" / "gitclone-lora").mkdir(parents=True)
    (work / "runs" / "gitclone-lora" / "train_config.json").write_text("{}")  # a resume with no checkpoint
    out = _demo(work)
    log = work / "runs" / "gitclone-lora.out"
    assert out.returncode == 1 and f"training gitclone-lora failed (exit 1); its output: {log}" in out.stderr
    assert "no checkpoint to resume from" in log.read_text() and "daemon exited with 0" in out.stdout
    assert "Traceback" not in out.stderr
    children = subprocess.run(["pgrep", "-f", f"adapterd.cli .*{work}"], capture_output=True, text=True)
    assert children.stdout == "", "a training or the daemon outlived the demo"
