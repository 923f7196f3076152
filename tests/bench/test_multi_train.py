"""bench/multi_train.py and the ``train`` part of bench/gpu_multi.sh on the CPU (tiny model, gloo), so that the
first two-GPU session's one device call is not lost to a wrong flag, a launch or a parse: the real command line,
torchrun beside this Python, the loss curves of one process and two ranks compared, the resume from rank 0's
checkpoint, the JSON and the RESULTS.md rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "bench"))

from multi_run import launch, loss_check, step_times  # noqa: E402
from multi_train import COLUMNS, SECTION, parse_args, to_row  # noqa: E402
from train_bench import build_base  # noqa: E402

TORCHRUN = Path(sys.executable).parent / "torchrun"


def gpu_multi(tmp_path: Path, *argv: str, train_args: str = "") -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "TRAIN_ARGS": train_args,
           "PYTHONFAULTHANDLER": "1",  # a rank dying of a signal prints its Python stacks in its launch's log
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_multi.sh"), *argv], capture_output=True, text=True,
                          timeout=400, env=env, cwd=REPO)


def _launch_logs(work: Path) -> str:
    """The end of each trainer launch's log (what a failed launch's one-line verdict leaves out)."""
    return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
                   for log in sorted(work.rglob("*.log")))


@pytest.mark.slow  # ~60 s: three trainer launches (one process, two ranks, two ranks resumed)
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed beside this Python")
def test_train_part_measures_one_process_against_two_ranks(tmp_path):
    """The train part end to end: the same global batch on one process and two gloo ranks gives the same loss
    at every step (fp32: to 1e-5), the loss falls, both are timed from rank 0's log, each rank's peak memory is
    read, the two-rank run resumes from rank 0's middle checkpoint with the same losses, and the saved JSON
    becomes RESULTS.md rows."""
    done = gpu_multi(tmp_path, "train", train_args=f"--tiny --methods lora --base-dir {tmp_path / 'base'} "
                     f"--workdir {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + _launch_logs(tmp_path / "work")
    out = tmp_path / "out"
    saved = json.loads((out / "multi_train.json").read_text())
    one, two = saved["results"]
    assert (one["gpus"], two["gpus"]) == (1, 2) and one["global_batch"] == two["global_batch"] == 4
    assert one["state"] == two["state"] == "completed" and len(one["losses"]) == len(two["losses"]) == 7
    assert two["losses"][-1] < two["losses"][0]  # it trains
    assert two["loss_check"]["ok"] and two["loss_check"]["max_rel"] <= 1e-5 and two["loss_check"]["steps"] == 7
    assert two["speedup"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert one["tokens_per_s"] > 0 and two["status_tokens_per_s"] > 0 and two["median_step_s"] > 0
    assert one["status_counts_all_ranks"] and two["status_counts_all_ranks"]  # 7 steps x 4 x 64 tokens
    assert len(one["peak_gib"]) == 1 and len(two["peak_gib"]) == 2 and min(two["peak_gib"]) > 0.1  # ranks' RSS
    assert two["checkpoints"] == ["checkpoint-4", "checkpoint-7"]  # rank 0's: the middle one, the last one
    assert two["resume"] == {"from": 4, "state": "completed", "ok": True, "max_rel": 0.0, "worst_step": 1,
                             "rtol": 1e-5, "steps": 3}
    assert "| lora | 2 | 4 x 64 | 6 |" in (out / "multi_train.log").read_text()
    assert "base and 28 records ready" in (out / "multi_train_base.log").read_text()
    results = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "multi_train.py"), "--append-from",
                    str(out / "multi_train.json"), "--results", str(results)], check=True, capture_output=True)
    lines = results.read_text().splitlines()
    rows = lines[lines.index(SECTION):]
    assert rows[4] == "| " + " | ".join(COLUMNS) + " |" and sum(r.startswith("| 20") for r in rows) == 2


def test_an_unknown_part_is_refused(tmp_path):
    done = gpu_multi(tmp_path, "nonsense")
    assert done.returncode == 2 and "usage: bash bench/gpu_multi.sh [tests|load [int8|none]|train|all]" in done.stderr


@pytest.mark.parametrize(("argv", "message"), [(["--gpus", "1"], "--gpus at least 2"),
                                               (["--methods", "lora,adalora"], "unknown method 'adalora'"),
                                               (["--warmup", "0"], "--warmup must be at least 1")])
def test_bad_options_are_refused_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_loss_check_names_the_worst_step():
    curve = [10.0, 9.0, 8.0]
    assert loss_check(curve, list(curve), 1e-5)["ok"]
    off = loss_check(curve, [10.0, 9.0 * (1 + 3e-5), 8.0], 1e-5)
    assert not off["ok"] and off["worst_step"] == 2 and off["max_rel"] == pytest.approx(3e-5)
    assert not loss_check(curve, curve[:2], 1e-5)["ok"]  # a run that stopped early never agrees


def test_step_times_read_rank_zero_log_and_a_resume_wins(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("2026-12-02 00:00:00,000 INFO loss: torch\n"
                   "2026-12-02 00:00:01,250 INFO step 1/3 epoch 0.33 loss 7.1000 lr 0.01\n"
                   "2026-12-02 00:00:01,750 INFO step 2/3 epoch 0.67 loss 7.0000 lr 0.01\n"
                   "2026-12-02 00:00:02,000 INFO saved /x/checkpoint-2\n"
                   "2026-12-02 00:01:00,000 INFO step 2/3 epoch 0.67 loss 7.0000 lr 0.01\n")
    times = step_times(log)
    assert sorted(times) == [1, 2] and times[2] - times[1] == pytest.approx(58.75)


def test_launch_ends_the_whole_process_group_at_its_timeout(tmp_path):
    """torchrun's ranks are its children: a launch past its time ends them too, not only the launcher."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    done = launch(["sh", "-c", script], dict(os.environ), 1, 1.0, tmp_path / "run.log")
    assert done.error == "timed out after 1 s" and time.monotonic() - started < 15
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]


def test_launch_reports_the_trainers_own_verdict(tmp_path):
    script = "import sys; print('noise'); print('adapterd train: --data x: no such file'); print('tail'); sys.exit(2)"
    done = launch([sys.executable, "-c", script], dict(os.environ), 1, 30.0, tmp_path / "run.log")
    assert done.error == "exit 2: adapterd train: --data x: no such file"


def two_gpu_result(**overrides) -> dict:
    result = {"method": "lora", "gpus": 2, "global_batch": 8, "context": 1024, "steps_timed": 20,
              "tokens_per_s": 15200.0, "status_tokens_per_s": 14900.0, "status_counts_all_ranks": True,
              "peak_gib": [10.5, 10.3],
              "speedup": 1.85, "loss_check": {"ok": True, "max_rel": 4e-4, "rtol": 2e-3, "worst_step": 7},
              "resume": {"from": 13, "state": "completed", "ok": True, "max_rel": 1e-4}}
    return result | overrides


def test_the_two_gpu_row_is_judged_on_speed_losses_and_resume():
    row = to_row(two_gpu_result(), "NVIDIA H200 x2", "abc1234", "2026-12-02 00:00")
    assert (row["x one GPU"], row["peak GiB per GPU"], row["tokens/s (all GPUs)"]) == ("1.85", "10.5, 10.3", "15,200")
    assert row["loss vs one GPU"] == "max rel 4.0e-04 (tol 0.002, step 7)"
    assert row["resume from rank 0"] == "from step 13: same (max rel 1.0e-04), completed"
    assert (row["target"], row["met"]) == (">= 1.8x, losses within tol, status.json counts all", "yes")
    slow = to_row(two_gpu_result(speedup=1.7), "m", "c", "d")
    drifted = to_row(two_gpu_result(loss_check={"ok": False, "max_rel": 5e-3, "rtol": 2e-3, "worst_step": 3}),
                     "m", "c", "d")
    not_resumed = to_row(two_gpu_result(resume={"from": 13, "error": "exit 1: adapterd train: failed"}), "m", "c", "d")
    half_counted = to_row(two_gpu_result(status_counts_all_ranks=False), "m", "c", "d")
    assert slow["met"] == drifted["met"] == not_resumed["met"] == half_counted["met"] == "no"
    assert half_counted["status.json tok/s"] == "14,900 (not all ranks' tokens)"
    assert not_resumed["resume from rank 0"] == "failed: exit 1: adapterd train: failed"
    assert to_row(two_gpu_result(), "cpu", "c", "d", judge=False)["met"] == ""  # the tiny run is not judged
    alone = {k: v for k, v in two_gpu_result().items() if k not in ("speedup", "loss_check")}
    assert to_row(alone, "m", "c", "d")["met"] == "no: no one-GPU run to compare"
    one_gpu = {k: v for k, v in alone.items() if k != "resume"} | {"gpus": 1}
    assert to_row(one_gpu, "m", "c", "d")["met"] == ""  # the baseline row carries no verdict
    failed = to_row({"method": "lora", "gpus": 2, "global_batch": 8, "context": 1024, "steps_timed": 20,
                     "error": "timed out after 170 s"}, "m", "c", "d")
    assert failed["met"] == "error: timed out after 170 s" and failed["tokens/s (all GPUs)"] == ""


def test_a_base_written_without_a_tokenizer_gets_one(tmp_path):
    """``adapterd train`` reads the base's tokenizer: a random base that train_bench wrote before it wrote one
    (a warm machine's) gets it added, with no temporary files left in the model directory."""
    from transformers import AutoTokenizer

    base = build_base(tmp_path / "base", tiny=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    before = {p.name for p in base.iterdir()}
    assert build_base(base, tiny=False) == base  # config.json is there: no 7B is made, only the tokenizer
    added = {p.name for p in base.iterdir()} - before
    assert "tokenizer.json" in added and not any(name.startswith(".") or name.startswith("tmp") for name in added)
    assert AutoTokenizer.from_pretrained(base)("hello world").input_ids
