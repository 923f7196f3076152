"""``adapterd train`` as a command: option errors, --fused-loss, and data parallel under torchrun (gloo on the CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import train_argv


def test_bad_option_exits_2_naming_it(make_config, subprocess_env):
    cfg = make_config(lora_r=0)
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--lora-r: must be at least 1" in out.stderr


@pytest.mark.parametrize("content, reason", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "record 1, field 'output': is missing"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 3}]',
     "record 1, field 'output': must be a string, not int"),
    ('{"instruction": "a", "output": "b"}\n{broken\n', "record 1: line 2 is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_malformed_data_is_one_line_exit_2(make_config, subprocess_env, tmp_path, content, reason):
    """A bad record (or file) is the user's input, not a crash: one line naming --data, the file and the
    record, exit 2, no traceback; status.json says failed with the same reason, train.log keeps the details."""
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = make_config(data=str(data))
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"adapterd train: --data {data}: ") and reason in lines[-1], out.stderr
    assert "Traceback" not in out.stderr and not any(reason in line for line in lines[:-1]), out.stderr
    status = json.loads((Path(cfg.output) / "status.json").read_text())
    assert status["state"] == "failed" and reason in status["error"]
    assert reason in (Path(cfg.output) / "train.log").read_text()


def test_resume_without_checkpoint_fails_in_status(make_config, subprocess_env):
    cfg = make_config()
    out = subprocess.run(train_argv(cfg, "--resume"), env=subprocess_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "no checkpoint to resume from" in out.stderr
    status = json.loads((Path(cfg.output) / "status.json").read_text())
    assert status["state"] == "failed" and "no checkpoint" in status["error"]


def test_a_resume_that_would_change_the_run_is_refused_and_writes_nothing(make_config, subprocess_env):
    """``--resume`` with a critical setting changed (here the learning rate) cannot continue the loss curve: exit
    2 naming the option and the run's value, before anything loads or is written, so status.json still says
    what the run did (a monitor polling TrainStatus sees no ``failed`` run that is in fact intact)."""
    cfg = make_config(max_steps=2, save_steps=2)
    done = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(cfg.output)
    before = {name: (run_dir / name).read_bytes() for name in ("status.json", "train_config.json", "train.log")}
    argv = [sys.executable, "-m", "adapterd.cli", "train", "--output", cfg.output, "--resume", "--max-steps", "4",
            "--learning-rate", "0.5"]
    out = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "adapterd train: --learning-rate: --resume with other settings than the run had: learning_rate (the run "
        "had learning_rate=0.01; an exact resume needs the same ones)")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this Python")
def test_torchrun_two_ranks(make_config, subprocess_env):
    """Two ranks each take every other micro-batch; rank 0 alone writes; the loss falls."""
    cfg = make_config(batch_size=1, max_steps=12, save_steps=6)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--nproc-per-node", "2", "-m", *train_argv(cfg)[2:]]
    out = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    run = Path(cfg.output)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 12
    assert status["epoch"] == 6.0  # 3 micro-batches an epoch, 2 a step, never across an epoch end
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


# ``python -m adapterd.cli`` with ``dist.destroy_process_group`` watched: the gloo threads each rank has before it
# and after it, written at the interpreter's exit (atexit, before its teardown) as RANK.json in sys.argv[1].
_WATCH_THE_GROUP = """
import atexit, json, os, runpy, sys, time
import torch.distributed as dist

def gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:
            pass  # ended meanwhile
    return [name for name in names if "gloo" in name]

seen, destroy, out = {}, dist.destroy_process_group, sys.argv.pop(1)

def destroy_and_look(*args, **kwargs):
    seen["before"] = gloo_threads()
    destroy(*args, **kwargs)
    deadline = time.monotonic() + 5  # a joined thread can stay listed for a moment while the kernel reaps it
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    seen["after"] = gloo_threads()

dist.destroy_process_group = destroy_and_look
atexit.register(lambda: open(os.path.join(out, os.environ["RANK"] + ".json"), "w").write(json.dumps(seen)))
runpy.run_module("adapterd.cli", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_torchrun_ranks_end_their_process_group_before_they_exit(make_config, subprocess_env, tmp_path):
    """The process group ends in the trainer's ``destroy_process_group``: each rank's gloo threads are gone
    before the interpreter's exit. Left running into it (the group kept alive by a module that bound it as a
    default argument), a thread freeing a finished collective's tensors there aborted a rank once in 33 and once in 53
    runs here (SIGABRT, "terminate called without an active exception") after a completed run."""
    cfg = make_config(batch_size=1, max_steps=2, save_steps=2)
    script, seen = tmp_path / "watch_the_group.py", tmp_path / "seen"
    script.write_text(_WATCH_THE_GROUP)
    seen.mkdir()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--nproc-per-node", "2", str(script), str(seen), *train_argv(cfg)[3:]]
    out = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((Path(cfg.output) / "status.json").read_text())["state"] == "completed"
    for rank in ("0", "1"):
        threads = json.loads((seen / f"{rank}.json").read_text())
        assert threads["before"], threads  # the group's threads were there to end (a probe that sees them)
        assert threads["after"] == [], threads


def _curve(run_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_defaults_on_cpu_train_exactly_as_before(make_config, subprocess_env):
    """``adapterd train`` with neither --fused-loss nor --kernels on the CPU: both default to auto, which is off
    here, so the run is bit for bit the one with both off; train.log says what auto chose and why."""
    from adapterd.trainer.config import TrainConfig
    from adapterd.trainer.loop import train

    assert (TrainConfig.fused_loss, TrainConfig.kernels) == ("auto", "auto")
    off = make_config(fused_loss="off", kernels="off", max_steps=4)
    train(off)
    default = make_config(max_steps=4, output=off.output + "-default")
    argv = train_argv(default)
    assert "--fused-loss" not in argv and "--kernels" not in argv
    out = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (Path(default.output) / "train.log").read_text()
    assert "fused loss: off (auto: the run is on cpu: the model's own loss, as with --fused-loss off)" in log
    assert "kernels: off (auto: liger-kernel's Triton kernels need a CUDA device, and this run is on cpu" in log
    assert "loss: plain" in log
    assert _curve(default.output) == _curve(off.output) and len(_curve(off.output)) == 4


@pytest.mark.slow
def test_cli_fused_loss_trains_as_the_plain_loss(make_config, subprocess_env):
    """``adapterd train --fused-loss torch`` on the CPU: the torch head (named in train.log), the same loss
    curve as ``--fused-loss off``; ``--fused-loss liger`` without CUDA: one line naming the flag, exit 2."""
    from adapterd.trainer.loop import train

    plain = train(make_config(fused_loss="off", max_steps=6))
    cfg = make_config(fused_loss="torch", max_steps=6, output=make_config().output + "-torch")
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss: torch" in (Path(cfg.output) / "train.log").read_text()
    curves = [_curve(run) for run in (cfg.output, make_config().output)]
    assert plain["step"] == len(curves[0]) == len(curves[1]) == 6
    for fused, loss in zip(*curves, strict=True):
        assert fused == pytest.approx(loss, rel=1e-4)
    cfg = make_config(fused_loss="liger", output=make_config().output + "-liger")
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("adapterd train: --fused-loss: liger: "), out.stderr
