"""``RUN_DIR/status.json``: what a run is doing, rewritten atomically after every optimizer step.

Readers (the daemon's ``TrainStatus`` and metrics, a person with ``cat``) never see a half-written file: it is
published by ``common.fsutil.write_atomic`` (temporary file, fsync, rename), and read by ``read_status``.
Units: seconds, tokens per second (non-padding tokens of the training batches), bytes, degrees Celsius,
utilisation as a fraction 0..1.

GPU readings come from NVML through ``common.nvml`` (the daemon's GPU gauges read the same) and only when a
GPU is there: without one the ``gpus`` key is absent, never zeros that look like readings.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common.fsutil import write_atomic
from ..common.nvml import Nvml

STATUS_FILE = "status.json"
STOP_FILE = "STOP"
STATES = ("pending", "running", "completed", "failed", "stopped")
FINAL_STATES = ("completed", "failed", "stopped")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` with ``payload`` as JSON, all at once (``common.fsutil.write_atomic``: temporary file,
    fsync, rename). Each writer has its own temporary file: the daemon's RPC handlers and its metrics
    collector may both record a dead run at once."""
    write_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status, or None when there is none, or it is not a JSON object (a foreign or damaged file:
    atomic writes never leave a half-written one), or it cannot be read. The one reader of status.json, for
    the trainer, ``TrainStatus`` and the metrics collector alike."""
    try:
        payload = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return payload if isinstance(payload, dict) else None


def run_dirs(runs_root: Path) -> list[Path]:
    """The run directories under ``runs_root`` (those holding a status.json; hidden ones are another
    program's temporary files), by name; [] when the root is missing or unreadable."""
    try:
        entries = list(runs_root.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if not p.name.startswith(".") and (p / STATUS_FILE).is_file())


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/PID/stat`` (state, ppid, ...), or None (no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None. With the pid it names one process: a
    pid is reused, the pair is not."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None  # field 22 of proc(5)


class GpuMonitor:
    """Readings of the GPUs this process trains on (``cuda_indices``, as torch numbers them), from
    ``common.nvml``; ``read()`` returns [] without a GPU or NVML. Keeps each device's peak memory in use."""

    def __init__(self, cuda_indices: list[int]) -> None:
        self._peak: dict[int, int] = {}
        self._nvml = Nvml() if cuda_indices else None
        gpus = self._nvml.gpus if self._nvml is not None else []
        self._gpus = [gpus[i] for i in cuda_indices if i < len(gpus)]

    def read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._nvml is None:
            return out
        for gpu in self._gpus:
            reading = self._nvml.read(gpu)
            row: dict[str, Any] = {"index": gpu.index}
            if reading.memory_used_bytes is not None:
                self._peak[gpu.index] = max(self._peak.get(gpu.index, 0), reading.memory_used_bytes)
                row["memory_used_bytes"] = reading.memory_used_bytes
                row["memory_peak_bytes"] = self._peak[gpu.index]
            for key in ("memory_total_bytes", "utilization", "temperature_celsius"):
                if getattr(reading, key) is not None:
                    row[key] = getattr(reading, key)
            if len(row) > 1:
                out.append(row)
        return out


@dataclass
class Status:
    """The fields of status.json (see the module docstring for units)."""

    run_id: str
    method: str
    output_dir: str
    state: str = "pending"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    smoothed_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    elapsed_seconds: float = 0.0
    eta_seconds: float | None = None
    last_checkpoint: str = ""
    final_adapter: str = ""
    exported_to: str = ""
    error: str = ""
    skipped_records: int = 0
    pid: int = field(default_factory=os.getpid)
    pid_start: int | None = field(default_factory=lambda: process_start(os.getpid()))
    started_unix: float = field(default_factory=time.time)
    updated_unix: float = field(default_factory=time.time)
    gpus: list[dict[str, Any]] | None = None


class StatusWriter:
    """Keeps the run's ``Status`` and rewrites status.json on every ``update``.

    The smoothed loss is an exponential moving average (weight 0.9 on the past, bias-corrected so that the
    first steps are not pulled towards 0). Tokens/s is measured over the steps since the writer started, so a
    resumed run does not count the time it was down. ETA = remaining steps x mean seconds per step so far.
    GPU readings are taken at most once a second (NVML calls cost about a millisecond each).
    """

    def __init__(self, run_dir: Path, method: str, gpu: GpuMonitor | None = None, *, beta: float = 0.9) -> None:
        self.path = run_dir / STATUS_FILE
        self.status = Status(run_id=run_dir.name, method=method, output_dir=str(run_dir.resolve()))
        self._gpu = gpu
        self._beta = beta
        self._ema = 0.0
        self._ema_n = 0
        self._t0 = time.monotonic()
        self._steps0: int | None = None
        self._tokens = 0
        self._elapsed_before = 0.0
        self._last_gpu = 0.0

    def resume_from(self, previous: dict[str, Any] | None) -> None:
        """Carry over the time already spent and the start time from an earlier status.json."""
        if previous:
            self._elapsed_before = float(previous.get("elapsed_seconds") or 0.0)
            self.status.started_unix = float(previous.get("started_unix") or self.status.started_unix)

    def record_step(self, step: int, loss: float, tokens: int) -> None:
        """Account one optimizer step: its mean loss and the non-padding tokens it trained on."""
        if self._steps0 is None:
            self._steps0 = step - 1
            self._t0 = time.monotonic()
        self._tokens += tokens
        self._ema_n += 1
        self._ema = self._beta * self._ema + (1 - self._beta) * loss
        self.status.loss = loss
        self.status.smoothed_loss = self._ema / (1 - self._beta ** self._ema_n)

    def update(self, **fields: Any) -> None:
        """Set fields, refresh the derived ones (elapsed, tokens/s, ETA, GPUs) and write the file."""
        st = self.status
        for name, value in fields.items():
            setattr(st, name, value)
        now = time.monotonic()
        run_time = now - self._t0
        st.elapsed_seconds = self._elapsed_before + run_time
        if self._steps0 is not None and run_time > 0:
            done = st.step - self._steps0
            st.tokens_per_second = self._tokens / run_time
            st.eta_seconds = max(st.total_steps - st.step, 0) * run_time / done if done > 0 else None
        if st.state in FINAL_STATES:
            st.eta_seconds = 0.0 if st.state == "completed" else None
        if self._gpu is not None and (now - self._last_gpu >= 1.0 or st.state in FINAL_STATES):
            readings = self._gpu.read()
            st.gpus = readings or None
            self._last_gpu = now
        st.updated_unix = time.time()
        payload = {k: v for k, v in asdict(st).items() if not (k == "gpus" and v is None)}
        for key in ("loss", "smoothed_loss", "eval_loss"):
            value = payload.get(key)
            if value is not None and not math.isfinite(value):
                payload[key] = None  # JSON has no NaN/inf; train.log keeps the raw value
        write_json_atomic(self.path, payload)
