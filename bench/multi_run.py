"""Pieces of bench/multi_train.py that watch a training run from outside: the launch (a process group ended
on timeout or on our own SIGTERM), the peak memory of each GPU or rank while it runs, the step times in rank
0's train.log, and the comparison of two loss curves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SAMPLE_S = 0.2  # memory sampling period: a step of the 7B runs takes ~0.5 s, the peak lasts a good part of it
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO step (\d+)/\d+ ")


@dataclass
class Launched:
    """How a launch ended: ``error`` (None when it exited 0) and the peak memory, GiB, per GPU or rank."""

    error: str | None
    peaks_gib: list[float] = field(default_factory=list)


class PeakMemory:
    """Peak memory of the first ``world`` GPUs (NVML's memory in use, as nvidia-smi shows it), or, without a
    GPU, of each process of the run's tree that starts no other (the ranks), by its kernel-kept peak RSS."""

    def __init__(self, root_pid: int, world: int) -> None:
        from adapterd.common.nvml import Nvml

        self._root, self._world = root_pid, world
        self._nvml = Nvml()
        self._gpus = self._nvml.gpus[:world]
        self._peak: dict[int, int] = {}  # GPU index or pid -> bytes

    def sample(self) -> None:
        if self._gpus:
            readings = {gpu.index: self._nvml.read(gpu).memory_used_bytes for gpu in self._gpus}
        else:
            readings = {pid: _peak_rss(pid) for pid in _leaves(self._root)}
        for key, value in readings.items():
            if value is not None:
                self._peak[key] = max(self._peak.get(key, 0), value)

    def peaks_gib(self) -> list[float]:
        """Per GPU in index order; per rank, the ``world`` largest."""
        values = ([self._peak[k] for k in sorted(self._peak)] if self._gpus else
                  sorted(self._peak.values(), reverse=True)[:self._world])
        return [round(v / 2**30, 2) for v in values]

    def close(self) -> None:
        self._nvml.close()


def _leaves(root: int) -> list[int]:
    """``root`` and its descendants that have no child of their own (from /proc)."""
    from adapterd.trainer.status import proc_stat

    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            parent[int(entry.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        grown = tree | {pid for pid, ppid in parent.items() if ppid in tree}
        grew, tree = grown != tree, grown
    return [pid for pid in tree if not any(parent.get(p) == pid for p in tree)]


def _peak_rss(pid: int) -> int | None:
    """VmHWM (the process's peak resident memory) in bytes, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        return None
    return None


def launch(argv: list[str], env: dict[str, str], world: int, timeout_s: float, log: Path) -> Launched:
    """Run ``argv`` (its output to ``log``) in a process group of its own, sampling memory; the whole group
    (torchrun and its ranks) is ended when it outlasts ``timeout_s`` or when this process is stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
    memory = PeakMemory(proc.pid, world)
    error = None
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            memory.sample()
            if time.monotonic() > deadline:
                error = f"timed out after {timeout_s:.0f} s"
                break
            time.sleep(SAMPLE_S)
    finally:
        _end_group(proc)
        memory.close()
    if error is None and proc.returncode != 0:
        error = f"exit {proc.returncode}: {_last_words(log)}"
    return Launched(error, memory.peaks_gib())


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the launch's group (the trainer checkpoints after its step and stops), SIGKILL 10 s later
    if still there."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nobody left in the group
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue


def _last_words(log: Path) -> str:
    """The trainer's own one-line verdict (``adapterd train: ...``), else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("adapterd train:")]
    return (said or lines or ["no output"])[-1][:300]


def step_times(train_log: Path) -> dict[int, float]:
    """Step -> seconds (since the epoch, local clock) of rank 0's ``step N/T`` lines; a resumed step's
    later line wins."""
    times: dict[int, float] = {}
    for line in train_log.read_text(errors="replace").splitlines():
        match = STEP_LINE.match(line)
        if match:
            times[int(match[2])] = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return times


def loss_check(reference: list[float], other: list[float], rtol: float) -> dict:
    """Step by step, ``other`` against ``reference``: the largest relative difference, at which step (1 is
    the first compared), and whether every step is within ``rtol`` (and the curves are as long)."""
    diffs = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(reference, other, strict=False)]
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else -1
    max_rel = diffs[worst] if diffs else float("inf")
    return {"ok": len(reference) == len(other) > 0 and max_rel <= rtol, "max_rel": max_rel,
            "worst_step": worst + 1, "rtol": rtol, "steps": len(diffs)}
