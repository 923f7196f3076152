"""TrainingManager end to end: each run a real ``adapterd train`` subprocess on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from adapterd.server.errors import AlreadyExists, InvalidArgument, NotFound
from adapterd.server.training import TrainingManager
from adapterd.v1 import adapterd_pb2 as pb

FAST = {"batch_size": "3", "learning_rate": "0.01", "eval_split": "0", "lora_dropout": "0",
        "num_virtual_tokens": "8"}


@pytest.fixture
def manager(tmp_path, tiny_model_dir, monkeypatch, subprocess_env) -> TrainingManager:
    for key in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(key, subprocess_env[key])
    return TrainingManager(tmp_path / "runs", tmp_path / "adapters", tiny_model_dir, "none", poll_seconds=0.05)


def _watch(manager: TrainingManager, run_id: str = "", timeout: float = 180) -> list[list[pb.TrainingRun]]:
    async def collect():
        return [runs async for runs in manager.watch(run_id)]

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def _wait_for_step(manager: TrainingManager, run_id: str, step: int, timeout: float = 120) -> pb.TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = manager.status(run_id)[0]
        if run.step >= step or run.state not in (pb.PENDING, pb.RUNNING):
            return run
        time.sleep(0.05)
    raise TimeoutError(run_id)


def test_start_watch_complete_and_export(manager, gitclone_data, tmp_path):
    request = pb.StartTrainingRequest(data_path=str(gitclone_data), method="ptuning-v2", run_id="pt-demo",
                                      options={**FAST, "max_steps": "30", "save_steps": "10"},
                                      export_adapter_id="team/gitclone")
    started = manager.start(request)
    assert started.run_id == "pt-demo" and started.state in (pb.PENDING, pb.RUNNING)
    assert started.output_dir == str((tmp_path / "runs" / "pt-demo").resolve())
    updates = _watch(manager, "pt-demo")
    states = [u[0].state for u in updates]
    assert pb.RUNNING in states and states[-1] == pb.COMPLETED, updates[-1]
    steps = [u[0].step for u in updates]
    # live updates while it ran: a step between the first and the last seen (a 30-step run of the tiny model
    # takes ~0.3 s on a fast machine: three or four polls)
    assert steps == sorted(steps) and any(0 < step < 30 for step in steps), steps
    final = updates[-1][0]
    assert (final.step, final.total_steps, final.method) == (30, 30, "ptuning-v2")
    assert final.HasField("loss") and final.HasField("smoothed_loss") and final.tokens_per_second > 0
    assert final.last_checkpoint.endswith("checkpoint-30") and not final.gpus and final.error == ""
    exported = tmp_path / "adapters" / "team" / "gitclone"
    assert json.loads((exported / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert [r.run_id for r in manager.status()] == ["pt-demo"]
    with pytest.raises(AlreadyExists):
        manager.start(pb.StartTrainingRequest(data_path=str(gitclone_data), method="lora", run_id="pt-demo"))
    with pytest.raises(AlreadyExists) as err:
        manager.start(pb.StartTrainingRequest(data_path=str(gitclone_data), method="lora",
                                              export_adapter_id="team/gitclone"))
    assert err.value.field == "export_adapter_id"


def test_stop_writes_a_checkpoint_and_kill_shows_failed(manager, gitclone_data):
    long = {**FAST, "max_steps": "100000", "save_steps": "100000"}
    manager.start(pb.StartTrainingRequest(data_path=str(gitclone_data), method="lora", run_id="long",
                                          options=long))
    doomed = manager.start(pb.StartTrainingRequest(data_path=str(gitclone_data), method="lora",
                                                   run_id="doomed", options=long))
    os.kill(json.loads((manager.runs_root / "doomed" / "status.json").read_text())["pid"], signal.SIGKILL)
    running = _wait_for_step(manager, "long", 5)
    assert running.state == pb.RUNNING and running.HasField("eta_seconds")
    stopping = manager.stop("long")
    assert stopping.state in (pb.RUNNING, pb.STOPPED)
    updates = _watch(manager)
    last = {r.run_id: r for r in updates[-1]}
    assert last["long"].state == pb.STOPPED and last["long"].last_checkpoint.endswith(f"checkpoint-{last['long'].step}")
    assert Path(last["long"].last_checkpoint, "adapter_model.safetensors").is_file()
    assert last["doomed"].state == pb.FAILED and "was killed" in last["doomed"].error
    assert doomed.run_id == "doomed"
    assert manager.stop("long").state == pb.STOPPED  # idempotent once ended
    assert json.loads((manager.runs_root / "doomed" / "status.json").read_text())["state"] == "failed"


def test_requests_are_validated(manager, gitclone_data, tmp_path):
    def start(**kwargs):
        kwargs.setdefault("data_path", str(gitclone_data))
        kwargs.setdefault("method", "lora")
        return manager.start(pb.StartTrainingRequest(**kwargs))

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": 1, "output": "c"}]')
    cases = [
        (dict(method="prompt-tuning"), InvalidArgument, "method"),
        (dict(data_path=""), InvalidArgument, "data_path"),
        (dict(data_path=str(tmp_path / "missing.json")), NotFound, "data_path"),
        (dict(data_path=str(bad)), InvalidArgument, "data_path"),
        (dict(options={"lora_rank": "8"}), InvalidArgument, "options[lora_rank]"),
        (dict(options={"lora_r": "eight"}), InvalidArgument, "options[lora_r]"),
        (dict(options={"batch_size": "0"}), InvalidArgument, "options[batch_size]"),
        (dict(run_id="../escape"), InvalidArgument, "run_id"),
        (dict(export_adapter_id="../outside"), InvalidArgument, "export_adapter_id"),
    ]
    for kwargs, exc, field in cases:
        with pytest.raises(exc) as err:
            start(**kwargs)
        assert err.value.field == field, kwargs
    with pytest.raises(InvalidArgument, match="record 1, field 'instruction'"):
        start(data_path=str(bad))
    with pytest.raises(NotFound):
        manager.status("nope")
    with pytest.raises(NotFound):
        manager.stop("nope")
    assert manager.status() == [] and not list(manager.runs_root.iterdir())
    assert _watch(manager) == [[]]


def _write_running(manager: TrainingManager, run_id: str, **fields) -> Path:
    run_dir = manager.runs_root / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"run_id": run_id, "state": "running", "step": 3,
                                                     "total_steps": 10, "loss": 1.5, **fields}))
    return run_dir


def test_a_recycled_pid_is_not_taken_for_the_trainer(manager):
    """The pid in status.json now belongs to another process (this one): its start time tells them apart."""
    from adapterd.trainer.status import process_start

    me, started = os.getpid(), process_start(os.getpid())
    run_dir = _write_running(manager, "recycled", pid=me, pid_start=started - 1)
    (run,) = manager.status("recycled")
    assert run.state == pb.FAILED and f"pid {me}) was killed" in run.error
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    _write_running(manager, "alive", pid=me, pid_start=started)
    assert manager.status("alive")[0].state == pb.RUNNING


def test_a_held_lock_means_alive_whatever_the_pid(manager):
    """A trainer in another pid namespace (a container) has a pid meaningless here; its lock still counts."""
    from adapterd.trainer import runlock

    gone = 2 ** 22 + 1  # above the largest pid_max Linux allows: no process here has it
    run_dir = _write_running(manager, "elsewhere", pid=gone, pid_start=1)
    fd = runlock.acquire(run_dir)
    try:
        assert manager.status("elsewhere")[0].state == pb.RUNNING
    finally:
        runlock.release(fd)
    (run,) = manager.status("elsewhere")  # lock dropped, pid not running: dead
    assert run.state == pb.FAILED and "was killed" in run.error


def test_train_status_and_the_metrics_agree_on_which_runs_exist(manager):
    """One reader of status.json for TrainStatus and the metrics collector: a run whose status.json is not
    a JSON object (an old or foreign file) or not UTF-8 is skipped by both, never an INTERNAL error for
    every other run; hidden directories are no run for either. Before, TrainStatus failed on the first
    two (``'list' object has no attribute 'get'``, a UnicodeDecodeError) and the metrics listed the third."""
    from adapterd.server.metrics.collectors import TrainingCollector

    me = os.getpid()
    _write_running(manager, "good", pid=me, pid_start=None)
    for name, raw in (("listed", b"[1, 2]"), ("latin1", b'{"run_id": "caf\xe9"}'), (".hidden", b"{}")):
        (manager.runs_root / name).mkdir()
        (manager.runs_root / name / "status.json").write_bytes(raw)
    assert [run.run_id for run in manager.status()] == ["good"]
    scraped = {s.labels["run_id"] for m in TrainingCollector(manager.runs_root).collect() for s in m.samples}
    assert scraped == {"good"}
