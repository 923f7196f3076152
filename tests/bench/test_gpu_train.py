"""bench/gpu_train.sh and train_bench.py's issue-20 additions on the CPU (tiny model), so that no device call is
lost to a wrong flag or path: each bench part writes its JSON, log and profiles to $OUT, and a fused-loss
scenario measures the same training as its plain twin (same first loss), and so does a kernels scenario on the
CPU (no liger there: ``--kernels auto`` runs none and the row says so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "bench"))

from train_bench import split_scenario, to_row  # noqa: E402


def run_part(tmp_path: Path, part: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    bench_args = f"--tiny --warmup 0 --steps 2 --workdir {tmp_path / 'base'}"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "SITE": str(tmp_path / "site"),
           "BENCH_ARGS": bench_args,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), part], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


@pytest.mark.slow  # ~50 s: the tiny model trained in four subprocesses
def test_lora_part_measures_plain_and_fused_alike(tmp_path):
    """The lora part on the tiny int8 model: the usual recipe, ours, ours with the fused loss and with the fused
    loss and the kernels all run; the fused scenarios' losses equal the plain one's at the first and last
    measured step (no kernels on the CPU: said in the result), and the profiles name their operators."""
    done = run_part(tmp_path, "lora")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    results = {r["scenario"]: r for r in json.loads((out / "train_lora.json").read_text())["results"]}
    assert sorted(results) == ["lora-int8", "lora-int8-fused", "lora-int8-fused-kernels", "usual-lora-int8"]
    plain, fused, kernels = results["lora-int8"], results["lora-int8-fused"], results["lora-int8-fused-kernels"]
    assert (plain["loss"], fused["loss"], kernels["loss"]) == ("plain", "torch", "torch")  # no liger on the CPU
    assert (plain["kernels"], kernels["kernels"]) == ("off", "off")
    for key in ("first_loss", "last_loss"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-5)
        assert kernels[key] == fused[key]
    log = (out / "train_lora.log").read_text()
    assert "lora-int8-fused-kernels: peak" in log
    assert "lora-int8-fused-kernels: kernels: off (auto: liger-kernel's Triton kernels need a CUDA device" in log
    assert "lora-int8: kernels:" not in log  # a scenario without the suffix never looks for them
    assert "lora-int8-fused: peak" in (out / "train_lora.log").read_text()
    profile = (out / "profile" / "profile-lora-int8-fused.txt").read_text()
    assert "top operators by cpu_time_total" in profile and "ChunkedLinearCrossEntropy" in profile
    assert "ChunkedLinearCrossEntropy" not in (out / "profile" / "profile-lora-int8.txt").read_text()


def test_an_unknown_part_is_refused(tmp_path):
    done = run_part(tmp_path, "nonsense")
    usage = "usage: bash bench/gpu_train.sh lora|ptuning|extra|tests|curve|isolate"
    assert done.returncode == 2 and usage in done.stderr


def test_fused_scenarios_are_judged_by_their_plain_twins_targets():
    assert split_scenario("lora-int8-fused") == ("lora-int8", "auto", "off")
    assert split_scenario("lora-int8-fused-torch") == ("lora-int8", "torch", "off")
    assert split_scenario("lora-int8-fused-torch-kernels") == ("lora-int8", "torch", "auto")
    assert split_scenario("ptuning-int8") == ("ptuning-int8", "off", "off")
    assert split_scenario("ptuning-int8-fused-kernels") == ("ptuning-int8", "auto", "auto")
    assert split_scenario("lora-int8-kernels") == ("lora-int8", "off", "auto")
    result = {"scenario": "lora-int8-fused", "batch": 4, "context": 1024, "peak_reserved_gib": 9.0,
              "peak_allocated_gib": 8.5, "tokens_per_s": 9100.0, "median_step_s": 0.45, "loss": "liger"}
    row = to_row(result, "NVIDIA H200", "abc1234", "2026-12-02 00:00")
    assert row["scenario"] == "lora-int8-fused (liger)"
    assert (row["target"], row["met"]) == ("<= 12 GiB, >= 9,000 tok/s", "yes")
    slow = to_row({**result, "scenario": "ptuning-int8-fused", "tokens_per_s": 8300.0}, "H200", "abc", "d")
    assert (slow["target"], slow["met"]) == ("<= 16 GiB, >= 9,000 tok/s", "no")
    both = to_row({**result, "scenario": "lora-int8-fused-kernels", "kernels": "liger"}, "H200", "abc", "d")
    assert both["scenario"] == "lora-int8-fused-kernels (liger, kernels liger)" and both["met"] == "yes"
    alone = to_row({**result, "scenario": "lora-int8-kernels", "loss": "plain", "kernels": "off"}, "H200", "a", "d")
    assert alone["scenario"] == "lora-int8-kernels (kernels off)"
    assert to_row(result, "H200", "a", "d")["scenario"] == "lora-int8-fused (liger)"  # no kernels: not named
