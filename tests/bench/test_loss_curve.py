"""bench/loss_curve.py through ``bash bench/gpu_train.sh curve`` on the CPU (tiny model, a few steps), so that the
GPU's one call for issue 20's figure is not lost to a typo: the JSON, the log, an SVG per method, and the rows
``--append-from`` writes into RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def run_part(tmp_path: Path, part: str, **args: str) -> Path:
    """``bash bench/gpu_train.sh PART`` as the device call runs it, with ``args`` (CURVE_ARGS=..., SEEDS_ARGS=...)
    keeping it small; fails the test unless it exits 0. Returns its $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "SITE": str(tmp_path / "site"), **args,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), part], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_curve_part_end_to_end_on_the_cpu(tmp_path):
    out = run_part(tmp_path, "curve", CURVE_ARGS=f"--steps 4 --workdir {tmp_path / 'work'}")
    saved = json.loads((out / "train_curve.json").read_text())
    assert saved["device"] == "cpu" and [r["method"] for r in saved["results"]] == ["lora", "ptuning-v2"]
    for r in saved["results"]:
        assert len(r["ours"]) == len(r["peft"]) == len(r["peft_alt"]) == 4
        # on the CPU the trainer's defaults are the plain fp32 path: its curve is the oracle's to float noise
        assert (r["dtype"], r["alt_dtype"]) == ("float32", "bfloat16")
        assert r["ours_vs_peft"]["max"] < 1e-4 and r["within_noise"]
        assert 0 < r["noise"]["max"] < 5e-2  # bf16 against fp32: some, and small
        assert len(r["peft_eager"]) == 4 and r["noise_attention"]["max"] < 1e-3  # eager and sdpa, both in fp32
        assert r["noise"] == max(r["noise_dtype"], r["noise_attention"], key=lambda d: d["max"])
        # the final adapters, each scored by plain PEFT in fp32: ours is the fp32 oracle's own run here
        final = r["final_loss"]
        assert final["ours"] == pytest.approx(final["peft"], rel=1e-4) and r["final_within_noise"]
        assert 0 < final["peft"] < r["peft"][0]  # trained: below the first step's loss
        assert r["trainer_said"] == [
            "kernels: off (auto: liger-kernel's Triton kernels need a CUDA device, and this run is on cpu)",
            "fused loss: off (auto: the run is on cpu: the model's own loss, as with --fused-loss off)",
            "loss: plain"]
        assert (out / f"curve-{r['method']}.svg").read_text().count("<polyline") == 4
    log = (out / "train_curve.log").read_text()
    assert "== ptuning-v2: 4 steps" in log and "within noise: yes" in log
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    subprocess.run([sys.executable, str(REPO / "bench" / "loss_curve.py"), "--append-from",
                    str(out / "train_curve.json"), "--results", str(results)], check=True, capture_output=True)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| ") and "| cpu |" in line]
    assert len(rows) == 2 and "| lora | 4 | float32 |" in rows[0]
    assert "(dtype) | yes; final loss ours " in rows[0] and rows[0].endswith(": yes |")


def test_isolate_part_runs_each_piece_of_the_fast_path_off(tmp_path):
    """``gpu_train.sh isolate``: our LoRA curve four times against one pair of PEFT curves, each with the flags it
    names passed to the trainer and recorded beside what the trainer said it ran."""
    out = run_part(tmp_path, "isolate", CURVE_ARGS=f"--steps 2 --workdir {tmp_path / 'work'}")
    flags = ["--kernels off", "--fused-loss off", "--fused-loss torch", "--kernels off --fused-loss off"]
    results = json.loads((out / "train_isolate.json").read_text())["results"]
    assert [r["trainer_said"][0] for r in results] == [f"flags: {f}" for f in flags]
    for r in results:
        assert r["method"] == "lora" and len(r["ours"]) == 2 and r["peft"] == results[0]["peft"]  # one PEFT run
        assert r["ours_vs_peft"]["max"] < 1e-4  # fp32 on the CPU: the oracle's curve whatever the flags
    said = results[0]["trainer_said"]
    assert not any(line.startswith("kernels: off (auto") for line in said)  # the flag turned them off, not auto
    assert any(line.startswith("fused loss: off (auto") for line in said)  # while the loss stayed at its default
    assert "== lora: 2 steps" in (out / "train_isolate.log").read_text()


def test_seeds_part_says_where_the_final_adapters_end_over_seeds(tmp_path):
    """``gpu_train.sh seeds``: every run once per seed, then ours' final distance from PEFT's against PEFT's own
    variants' (over_seeds), printed, saved and appended as its own table. On the CPU ours is the fp32 oracle's
    run, so it is within noise."""
    out = run_part(tmp_path, "seeds",
                   SEEDS_ARGS=f"--methods lora --steps 2 --seeds 7,8,9 --workdir {tmp_path / 'work'}")
    saved = json.loads((out / "train_seeds.json").read_text())
    assert [r["seed"] for r in saved["results"]] == [7, 8, 9]
    assert [r["trainer_said"][0] for r in saved["results"]][1:] == ["seed 8", "seed 9"]  # 7, the default, unsaid
    assert len({r["peft"][0] for r in saved["results"]}) > 1  # another seed, another LoRA A and batch order
    (summary,) = saved["over_seeds"]
    assert summary["seeds"] == [7, 8, 9] and summary["method"] == "lora"
    assert all(abs(d) < 1e-4 for d in summary["ours_minus_peft"]) and summary["within_noise"]
    assert summary["p"] > 0.05 and len(summary["variants_minus_peft"]) == 3
    assert sorted(p.name for p in out.glob("*.svg")) == ["curve-lora-s7.svg", "curve-lora-s8.svg", "curve-lora-s9.svg"]
    assert "the final adapters over seeds [7, 8, 9]" in (out / "train_seeds.log").read_text()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    subprocess.run([sys.executable, str(REPO / "bench" / "loss_curve.py"), "--append-from",
                    str(out / "train_seeds.json"), "--results", str(results)], check=True, capture_output=True)
    text = results.read_text()
    assert "## Training: where the final adapters end over seeds" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| ") and "| 7,8,9 |" in line]
    assert "| lora | 2 | (defaults) | 7,8,9 |" in row and row.endswith("| yes |")


def test_over_seeds_says_no_to_a_bias_and_yes_to_scatter():
    """The permutation test: ours ending farther from PEFT than every variant on each of 3 seeds is a "no"
    (p = 1/84, the smallest 3 of 9 can give); ours among the variants is a "yes"; 2 seeds can never say no."""
    sys.path.insert(0, str(REPO / "bench"))
    from loss_curve import over_seeds, permutation_p

    assert permutation_p([3, 3, 3], [1, 1, 1, 1, 1, 1]) == pytest.approx(1 / 84)
    assert permutation_p([1, 1], [1, 1, 1, 1]) == 1.0
    assert permutation_p([5, 5], [1, 1, 1, 1]) == pytest.approx(1 / 15)

    def runs(ours: list[float]) -> list[dict]:
        variants = [(0.0010, -0.0012), (-0.0008, 0.0015), (0.0011, 0.0009)]
        return [{"method": "lora", "steps": 200, "seed": seed, "flags": "",
                 "final_loss": {"peft": 0.25, "ours": 0.25 + d, "peft_alt": 0.25 + a, "peft_eager": 0.25 + e}}
                for seed, d, (a, e) in zip((7, 8, 9), ours, variants, strict=True)]

    biased = over_seeds(runs([0.0051, 0.0040, 0.0046]))
    assert not biased["within_noise"] and biased["p"] == pytest.approx(1 / 84)
    assert biased["ours_mean"] == pytest.approx(0.0045667, rel=1e-4)
    scattered = over_seeds(runs([0.0013, -0.0009, 0.0004]))
    assert scattered["within_noise"] and scattered["p"] > 0.3
    assert over_seeds(runs([0.0051, 0.0040, 0.0046])[:2])["within_noise"]  # 1/15 > 0.05: two seeds cannot say no
