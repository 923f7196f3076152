"""``ADAPTERD_PROFILE_DIR``: the engine thread profiles a window of loaded decode steps, once, and writes the
operator table where asked (bench/load_bench.py --profile-dir compares two processes' tables)."""

from __future__ import annotations

import os

from adapterd.server.engine.profiling import StepProfiler


class _Row:  # the profiler looks at how many rows a step had, nothing else
    pass


def test_profiles_the_window_after_the_skipped_loaded_steps_once(tmp_path):
    import torch

    profiler = StepProfiler(tmp_path, skip=2, steps=3, min_rows=2)
    big, small = [_Row(), _Row()], [_Row()]
    path = tmp_path / f"engine-{os.getpid()}.txt"
    for rows in (small, big, small, big):  # small steps do not count toward the skip; the window opens here
        profiler.decode_step(rows, 0.01)
    assert profiler._profile is not None and not path.exists()
    for _ in range(3):
        torch.ones(64).matmul(torch.ones(64))  # an operator inside the window
        profiler.decode_step(big, 0.01)
    text = path.read_text()
    assert text.startswith(f"engine thread of process {os.getpid()}: 3 decode steps of 2.0 rows on average")
    assert "by host time" in text and "aten::" in text
    path.unlink()
    for _ in range(10):  # once only: a long run does not profile again
        profiler.decode_step(big, 0.01)
    assert not path.exists() and profiler._profile is None


def test_off_unless_the_environment_asks(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPTERD_PROFILE_DIR", raising=False)
    assert StepProfiler.from_env() is None
    monkeypatch.setenv("ADAPTERD_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("ADAPTERD_PROFILE_MIN_ROWS", "2")
    profiler = StepProfiler.from_env()
    assert profiler.path == tmp_path / f"engine-{os.getpid()}.txt" and profiler.min_rows == 2
    assert profiler.skip == 200  # the default: a steady load first
    monkeypatch.setenv("ADAPTERD_PROFILE_SKIP_STEPS", "20")
    assert StepProfiler.from_env().skip == 20
