"""Training runs under the daemon's runs root: start, stop, status and watch, for the Train* RPCs.

Each run is its own OS process (``python -m adapterd.cli train ...``, in a new session so that a signal to
the daemon's terminal never reaches it, and it outlives a daemon restart), never a thread of the serving
process: training and serving would otherwise share one GIL, one CUDA context and one crash. Everything the
manager knows about a run it reads from ``RUNS_ROOT/RUN_ID/status.json``, which the trainer rewrites
atomically every step, so runs started by an earlier daemon show up too.

A run whose trainer is gone while its status.json still says pending/running died without finishing
(``kill -9``, out of memory): it is reported, and recorded, as ``failed`` (``stopped`` when a stop had been
asked for). Whether it is gone is ``trainer.runlock``'s rule, the one the metrics collector uses too: the
trainer's lock on its run directory, else its pid with the pid's start time (a recycled pid is not the
trainer). This class holds no gRPC code; it raises ``adapterd.server.errors`` and the handler maps them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..trainer import runlock
from ..trainer.config import METHODS, QUANTIZATIONS, ConfigError, TrainConfig, option_names, parse_value
from ..trainer.status import (
    FINAL_STATES,
    STATUS_FILE,
    STOP_FILE,
    Status,
    process_start,
    read_status,
    write_json_atomic,
)
from ..v1 import adapterd_pb2 as pb
from .adapters.ids import resolve_adapter_dir
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def _config_export(run_dir: Path) -> Path | None:
    """The export path a run's saved train_config.json names, if any."""
    try:
        path = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8")).get("export_adapter")
    except (OSError, ValueError):
        return None
    return Path(path).resolve() if path else None


def run_to_pb(payload: dict[str, Any]) -> pb.TrainingRun:
    """status.json -> ``TrainingRun``. Optional numbers stay unset when absent (never a fake 0)."""
    run = pb.TrainingRun(
        run_id=str(payload.get("run_id", "")),
        state=pb.TrainingState.Value(str(payload.get("state", "pending")).upper()),
        method=str(payload.get("method", "")),
        step=int(payload.get("step") or 0),
        total_steps=int(payload.get("total_steps") or 0),
        epoch=float(payload.get("epoch") or 0.0),
        learning_rate=float(payload.get("learning_rate") or 0.0),
        tokens_per_second=float(payload.get("tokens_per_second") or 0.0),
        elapsed_seconds=float(payload.get("elapsed_seconds") or 0.0),
        last_checkpoint=str(payload.get("last_checkpoint") or ""),
        error=str(payload.get("error") or ""),
        updated_unix=float(payload.get("updated_unix") or 0.0),
        output_dir=str(payload.get("output_dir") or ""),
        skipped_records=int(payload.get("skipped_records") or 0),
        final_adapter=str(payload.get("final_adapter") or ""),
        exported_to=str(payload.get("exported_to") or ""),
    )
    for name in ("loss", "smoothed_loss", "eval_loss", "eta_seconds"):
        if payload.get(name) is not None:
            setattr(run, name, float(payload[name]))
    for gpu in payload.get("gpus") or []:
        run.gpus.add(**{k: gpu[k] for k in ("index", "memory_used_bytes", "memory_peak_bytes",
                                             "memory_total_bytes", "utilization", "temperature_celsius")
                        if k in gpu})
    return run


class TrainingManager:
    """Starts trainer processes and reports on every run under ``runs_root``.

    ``start`` validates the request (data file readable and well-formed, method, options, export id) and
    returns at once with the run ``pending``; loading the model happens in the child. It reads the whole
    data file to check it, so call it off the event loop (``asyncio.to_thread``) for large files.
    """

    def __init__(self, runs_root: Path, adapter_root: Path, base_model_dir: Path, quantization: str, *,
                 python: str = sys.executable, poll_seconds: float = 0.2) -> None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
        self.runs_root = Path(runs_root)
        self.adapter_root = Path(adapter_root)
        self.base_model_dir = Path(base_model_dir)
        self.quantization = quantization
        self.python = python
        self.poll_seconds = poll_seconds
        self._procs: dict[str, subprocess.Popen] = {}
        self._exports: dict[str, Path] = {}
        self.runs_root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------- start

    def _new_run_id(self) -> str:
        stamp = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
        run_id, n = stamp, 1
        while (self.runs_root / run_id).exists():
            n += 1
            run_id = f"{stamp}-{n}"
        return run_id

    def _export_path(self, export_id: str) -> Path:
        path = resolve_adapter_dir(self.adapter_root, export_id, "export_adapter_id", must_exist=False)
        if path.exists():
            raise AlreadyExists(f"adapter {export_id!r} already exists", field="export_adapter_id")
        for payload in self._payloads(""):
            if payload.get("state") in FINAL_STATES:
                continue
            if self._exports.get(payload.get("run_id", "")) == path or _config_export(
                    self.runs_root / payload.get("run_id", "")) == path:
                raise AlreadyExists(f"run {payload['run_id']} already exports to {export_id!r}",
                                    field="export_adapter_id")
        return path

    def _config(self, request: pb.StartTrainingRequest, run_dir: Path, export: Path | None) -> TrainConfig:
        values: dict[str, Any] = {"base": str(self.base_model_dir), "data": request.data_path,
                                  "method": request.method, "output": str(run_dir),
                                  "quantization": self.quantization, "export_adapter": str(export or "")}
        allowed = option_names()
        for key, text in request.options.items():
            name = key.replace("-", "_")
            if name not in allowed:
                raise InvalidArgument(f"unknown option; known: {', '.join(sorted(allowed))}",
                                      field=f"options[{key}]")
            try:
                values[name] = parse_value(name, text)
            except ConfigError as exc:
                raise InvalidArgument(exc.message, field=f"options[{key}]") from None
        cfg = TrainConfig.from_dict(values)
        try:
            cfg.validate(check_paths=False)
        except ConfigError as exc:
            field = {"data": "data_path", "method": "method"}.get(exc.field, f"options[{exc.field}]")
            raise InvalidArgument(exc.message, field=field) from None
        return cfg

    def start(self, request: pb.StartTrainingRequest) -> pb.TrainingRun:
        """Validate, create RUN_DIR with a ``pending`` status.json, launch the trainer process."""
        from ..trainer.data import DataError, load_records

        if request.method not in METHODS:
            raise InvalidArgument(f"must be one of {', '.join(METHODS)}", field="method")
        if not request.data_path:
            raise InvalidArgument("is required", field="data_path")
        data = Path(request.data_path)
        if not data.is_file():
            raise NotFound(f"no such file on the server: {request.data_path}", field="data_path")
        if not self.base_model_dir.is_dir():
            raise FailedPrecondition(f"the base model directory {self.base_model_dir} is missing")
        run_id = request.run_id or self._new_run_id()
        if not RUN_ID.match(run_id):
            raise InvalidArgument("must be 1-128 of letters, digits, '_', '-', '.', not starting with a "
                                  "punctuation mark", field="run_id")
        run_dir = self.runs_root / run_id
        if run_dir.exists():
            raise AlreadyExists(f"run {run_id!r} already exists", field="run_id")
        export = self._export_path(request.export_adapter_id) if request.export_adapter_id else None
        cfg = self._config(request, run_dir, export)
        try:
            load_records(data, skip_malformed=cfg.skip_malformed)
        except DataError as exc:
            raise InvalidArgument(str(exc), field="data_path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read: {exc}", field="data_path") from None

        run_dir.mkdir(parents=True)
        argv = [self.python, "-m", "adapterd.cli", "train", "--no-progress"]
        for name, value in vars(cfg).items():
            if name == "resume" or value in ("", None) or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        status = Status(run_id=run_id, method=cfg.method, output_dir=str(run_dir.resolve()))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run_dir / "stdout.log", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=run_dir, env=env, start_new_session=True)
        self._procs[run_id] = proc
        status.pid, status.pid_start = proc.pid, process_start(proc.pid)  # not yet reaped: still its pid
        payload = {k: v for k, v in vars(status).items() if v is not None}
        if export is not None:
            self._exports[run_id] = export
        if read_status(run_dir) is None:  # the child may already have written its own
            write_json_atomic(run_dir / STATUS_FILE, payload)
        return self.status(run_id)[0]

    # ----------------------------------------------------------------------------------------- stop

    def stop(self, run_id: str) -> pb.TrainingRun:
        """Ask a run to stop: RUN_DIR/STOP plus SIGTERM to its process group. The trainer finishes its step,
        writes a checkpoint and marks itself ``stopped``; this returns at once (watch for the end)."""
        payload = self._payload(run_id)
        if payload.get("state") in FINAL_STATES:
            return run_to_pb(payload)
        run_dir = self.runs_root / run_id
        (run_dir / STOP_FILE).touch()
        pid = int(payload.get("pid") or 0)
        proc = self._procs.get(run_id)
        if proc is not None and proc.poll() is None:
            pid = proc.pid
        elif payload.get("pid_start") is None or not runlock.process_alive(pid, int(payload["pid_start"])):
            return self.status(run_id)[0]  # not a process known to be the trainer: the STOP file must do
        try:
            os.killpg(pid, signal.SIGTERM)  # start_new_session: the group id is the trainer's pid
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return self.status(run_id)[0]

    # --------------------------------------------------------------------------------------- status

    def _run_dirs(self) -> list[Path]:
        if not self.runs_root.is_dir():
            return []
        return sorted(p for p in self.runs_root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / STATUS_FILE).is_file())

    def _process_gone(self, run_id: str, payload: dict[str, Any]) -> int | None | bool:
        """False while the run's trainer lives; else its exit code (None when unknown)."""
        proc = self._procs.get(run_id)
        if proc is not None and proc.pid == payload.get("pid", proc.pid):
            code = proc.poll()
            return False if code is None else code
        return False if runlock.trainer_alive(self.runs_root / run_id, payload) else None

    def _payload(self, run_id: str) -> dict[str, Any]:
        if not RUN_ID.match(run_id or "") or not (self.runs_root / run_id / STATUS_FILE).is_file():
            raise NotFound(f"no run {run_id!r} under {self.runs_root}", field="run_id")
        return self._payloads(run_id)[0]

    def _payloads(self, run_id: str) -> list[dict[str, Any]]:
        dirs = [self.runs_root / run_id] if run_id else self._run_dirs()
        out = []
        for run_dir in dirs:
            payload = read_status(run_dir)
            if payload is None:
                continue
            if payload.get("state") not in FINAL_STATES:
                gone = self._process_gone(run_dir.name, payload)
                if gone is not False:
                    payload = runlock.mark_dead(run_dir, payload, gone)
            out.append(payload)
        return sorted(out, key=lambda p: (p.get("started_unix") or 0.0, p.get("run_id", "")))

    def status(self, run_id: str = "") -> list[pb.TrainingRun]:
        """Every run under the runs root (oldest first), or the one named; NotFound for an unknown id."""
        if run_id:
            self._payload(run_id)
        return [run_to_pb(p) for p in self._payloads(run_id)]

    # ---------------------------------------------------------------------------------------- watch

    def _signature(self, run_id: str) -> tuple:
        dirs = [self.runs_root / run_id] if run_id else self._run_dirs()
        sig = []
        for d in dirs:
            try:
                sig.append((d.name, (d / STATUS_FILE).stat().st_mtime_ns))
            except FileNotFoundError:
                sig.append((d.name, 0))
        return tuple(sig)

    async def watch(self, run_id: str = "") -> AsyncIterator[list[pb.TrainingRun]]:
        """Yield the runs now, then again on every change (status.json rewritten, a run added or its process
        gone), polling every ``poll_seconds``; ends after the update in which every watched run has ended.
        A run's death is checked on each poll, since a killed process writes nothing."""
        last: list[bytes] | None = None
        sig: tuple | None = None
        payloads: list[dict[str, Any]] = []
        while True:
            new_sig = self._signature(run_id)
            if new_sig != sig or self._any_gone(payloads):
                sig = new_sig
                if run_id:
                    self._payload(run_id)  # NotFound for an unknown id, on the first poll
                payloads = self._payloads(run_id)
                encoded = [run_to_pb(p).SerializeToString(deterministic=True) for p in payloads]
                if encoded != last:
                    last = encoded
                    yield [run_to_pb(p) for p in payloads]
                if all(p.get("state") in FINAL_STATES for p in payloads):
                    return
            await asyncio.sleep(self.poll_seconds)

    def _any_gone(self, payloads: list[dict[str, Any]]) -> bool:
        return any(p.get("state") not in FINAL_STATES and self._process_gone(p.get("run_id", ""), p) is not False
                   for p in payloads)
