"""A torch profile of the engine thread's decode steps under load, for benches (off unless asked for).

``ADAPTERD_PROFILE_DIR=<dir>`` in the environment of the process that builds the engine (the engine core, or a
bench driving the engine in-process; a spawned core inherits it): once the batch has run ``SKIP_STEPS`` decode
steps of at least ``MIN_ROWS`` rows (graphs captured, the pool grown, a steady load;
``ADAPTERD_PROFILE_SKIP_STEPS`` and ``ADAPTERD_PROFILE_MIN_ROWS`` override them), the next ``PROFILED_STEPS``
decode steps are profiled, CPU and CUDA, and their operator tables are written to ``<dir>/engine-<pid>.txt``.
Two processes' tables of the same load (bench/load_bench.py ``--profile-dir``: the engine alone against the
engine core) then say whether a slower step spends its time on the device (the same kernels taking longer) or
on the host (the same operators' CPU time, or time in neither).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .batch import Row
from .observer import EngineObserver

log = logging.getLogger(__name__)

ENV = "ADAPTERD_PROFILE_DIR"
MIN_ROWS_ENV = "ADAPTERD_PROFILE_MIN_ROWS"
SKIP_ENV = "ADAPTERD_PROFILE_SKIP_STEPS"  # fewer for a short load (tests/bench/test_gpu_core.py on a busy CPU)
SKIP_STEPS = 200  # decode steps of MIN_ROWS or more before the profile: ~4 s of a 64-stream load on an H200
PROFILED_STEPS = 50
MIN_ROWS = 32
TABLE_ROWS = 25


class StepProfiler(EngineObserver):
    """Profiles decode steps ``skip + 1 .. skip + steps`` among those of ``min_rows`` rows or more."""

    def __init__(self, out_dir: Path, skip: int = SKIP_STEPS, steps: int = PROFILED_STEPS,
                 min_rows: int = MIN_ROWS) -> None:
        self.path = out_dir / f"engine-{os.getpid()}.txt"
        self.skip, self.steps, self.min_rows = skip, steps, min_rows
        self._seen = 0  # decode steps of min_rows or more so far
        self._profile: profile | None = None
        self._started = 0.0
        self._rows = 0

    @classmethod
    def from_env(cls) -> StepProfiler | None:
        out = os.environ.get(ENV)
        if not out:
            return None
        return cls(Path(out), skip=int(os.environ.get(SKIP_ENV, SKIP_STEPS)),
                   min_rows=int(os.environ.get(MIN_ROWS_ENV, MIN_ROWS)))

    def decode_step(self, rows: list[Row], seconds: float) -> None:
        if len(rows) < self.min_rows or self._seen > self.skip + self.steps:
            return
        self._seen += 1
        if self._seen == self.skip:  # the profile starts after this step and covers the next ``steps``
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profile = profile(activities=activities)
            self._profile.__enter__()
            self._started = time.perf_counter()
        elif self._profile is not None:
            self._rows += len(rows)
            if self._seen == self.skip + self.steps:
                self._write()

    def _write(self) -> None:
        assert self._profile is not None
        wall = time.perf_counter() - self._started
        self._profile.__exit__(None, None, None)
        averages = self._profile.key_averages()
        self._profile = None
        self._seen += 1  # done: no second profile
        header = (f"engine thread of process {os.getpid()}: {self.steps} decode steps of {self._rows / self.steps:.1f} "
                  f"rows on average, {wall / self.steps * 1000:.2f} ms apart (profiler on)\n")
        tables = [header]
        if torch.cuda.is_available():
            tables += ["\nby device time\n", averages.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS)]
        tables += ["\nby host time\n", averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(tables), encoding="utf-8")
        tmp.replace(self.path)
        log.info("wrote the engine's step profile to %s", self.path)
