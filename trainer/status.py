"""``RUN_DIR/status.json``: what a run is doing, rewritten atomically after every optimizer step.

Readers (the daemon's ``TrainStatus``, a person with ``cat``) never see a half-written file: the JSON goes to
a temporary file in the same directory, then ``os.replace`` swaps it in. Units: seconds, tokens per second
(non-padding tokens of the training batches), bytes, degrees Celsius, utilisation as a fraction 0..1.

GPU readings come from NVML (``pynvml``, package nvidia-ml-py) and only when a GPU is there: without one
the ``gpus`` key is absent, never zeros that look like readings.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
STOP_FILE = "STOP"
STATES = ("pending", "running", "completed", "failed", "stopped")
FINAL_STATES = ("completed", "failed", "stopped")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX). The temporary
    name is per process and thread: the daemon's RPC handlers and its metrics collector may both record a
    dead run at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status, or None when there is none yet (or it cannot be parsed, which atomic writes avoid)."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
    """NVML readings of the GPUs this process trains on; ``read()`` returns [] without a GPU or NVML."""

    def __init__(self, cuda_indices: list[int]) -> None:
        self._handles: list[tuple[int, Any]] = []
        self._peak: dict[int, int] = {}
        self._nvml: Any = None
        if not cuda_indices:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # pynvml.NVMLError (no driver / no GPU) or the module missing
            return
        self._nvml = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        mapping = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else []
        for i in cuda_indices:
            index = mapping[i] if i < len(mapping) else i
            try:
                self._handles.append((index, pynvml.nvmlDeviceGetHandleByIndex(index)))
            except pynvml.NVMLError:
                continue

    def read(self) -> list[dict[str, Any]]:
        out = []
        for index, handle in self._handles:
            nv = self._nvml
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                util = nv.nvmlDeviceGetUtilizationRates(handle)
                temp = nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
            except nv.NVMLError:
                continue
            self._peak[index] = max(self._peak.get(index, 0), int(mem.used))
            out.append({"index": index, "memory_used_bytes": int(mem.used),
                        "memory_peak_bytes": self._peak[index], "memory_total_bytes": int(mem.total),
                        "utilization": util.gpu / 100.0, "temperature_celsius": float(temp)})
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
