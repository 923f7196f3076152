"""What ``adapterd train --resume`` does to the files of an existing run, as the user sees it on the command
line: a completed run is left alone, a STOP file is consumed when honoured and a stale one does not stop a
resume, each step is in metrics.jsonl once, and a second trainer on a live run is refused."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from adapterd.trainer.loop import train
from tests.trainer.conftest import train_argv


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the run directory: its bytes and its modification time (ns)."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


def _resume(cfg, env, *extra: str) -> subprocess.CompletedProcess:
    argv = [*train_argv(cfg)[:5], "--output", cfg.output, "--resume", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_of_a_completed_run_says_so_and_changes_nothing(make_config, subprocess_env, tmp_path):
    import shutil

    exported = tmp_path / "exported"
    cfg = make_config(max_steps=4, save_steps=2, export_adapter=str(exported))
    train(cfg)
    run = Path(cfg.output)
    before = _snapshot(run)
    out = _resume(cfg, subprocess_env)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "already completed at step 4/4; nothing to do" in lines[0], out.stderr
    assert _snapshot(run) == before
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["loss"] is not None and status["tokens_per_second"] > 0

    # The exported adapter deleted since: the resume (as the demo re-runs it) exports it again, and only that.
    shutil.rmtree(exported)
    out = _resume(cfg, subprocess_env)
    assert out.returncode == 0 and f"exported its final adapter again to {exported}" in out.stderr, out.stderr
    weights = "adapter_model.safetensors"
    assert (exported / weights).read_bytes() == (run / "final" / weights).read_bytes()
    assert _snapshot(run) == before


def test_stop_file_is_consumed_and_a_stale_one_does_not_stop_a_resume(make_config, subprocess_env, monkeypatch):
    from adapterd.trainer import checkpoint

    cfg = make_config(max_steps=6, save_steps=2)
    run = Path(cfg.output)
    real_save = checkpoint.save_checkpoint

    def save_then_stop(run_dir, step, *args, **kwargs):  # the user creates STOP after checkpoint-2
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 2:
            (run_dir / "STOP").touch()
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    assert train(cfg)["state"] == "stopped"
    monkeypatch.undo()
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("stopped", 2)
    assert not (run / "STOP").exists()  # honoured, so consumed

    # A STOP left from before (an earlier stop request whose run had already ended) must not stop this one.
    (run / "STOP").touch()
    old = time.time() - 60
    os.utime(run / "STOP", (old, old))
    out = _resume(cfg, subprocess_env)
    assert out.returncode == 0, out.stderr
    assert "removed" in out.stderr and "STOP" in out.stderr and "completed at step 6/6" in out.stderr
    assert not (run / "STOP").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_second_trainer_on_a_live_run_is_refused(make_config, subprocess_env):
    from adapterd.trainer import runlock

    cfg = make_config(max_steps=2)
    run = Path(cfg.output)
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    fd = runlock.acquire(run)  # this process plays the live trainer
    try:
        before = _snapshot(run)
        out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=120)
    finally:
        runlock.release(fd)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"adapterd train: --output: {run} is being trained by another process "
                                  f"(pid {os.getpid()} holds trainer.lock)")
    assert _snapshot(run) == before


def test_metrics_are_cut_back_to_the_restart_step(tmp_path):
    from adapterd.trainer.resume import truncate_metrics

    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "lo')  # a kill cut the last line
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    truncate_metrics(tmp_path, 2)  # nothing to drop: not rewritten
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before
    assert not list(tmp_path.glob(".*tmp"))
