"""bench/gpu_core.sh's load part, the next GPU session's issue-14 measurement, end to end on the CPU with the tiny
shape (``LOAD_ARGS``, whose arguments override the script's), so that no device time is lost to a wrong flag:
its log and the streams, TTFT and Zipf lines it promises land in $OUT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow  # ~60 s: the tiny model served in-process and by a daemon, both phases and the Zipf sweep
def test_load_part(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = (f"--shape tiny --adapters 20 --distinct 2 --duration 2 --zipf-duration 2 --new 8 --streams 4 "
            f"--client-procs 1 --frontends 1 --work {tmp_path / 'work'} --no-record")
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "LOAD_ARGS": args,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_core.sh"), "load", "none"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (out / "load_none.log").read_text()
    assert "4 streams: engine alone" in log and "over gRPC" in log, log[-2000:]
    assert "time to first token, 512-token prompt" in log
    assert any(line.startswith("| 8/s |") for line in log.splitlines()), log[-2000:]
    assert (out / "RESULTS.md").is_file()


@pytest.mark.slow  # ~60 s: the streams phase alone, both ways, each side's decode steps profiled
def test_profile_part(tmp_path):
    """The profile part's tables, one per side. Its ratio is not asserted: the profiler runs in the window and
    writing its tables stalls the engine thread (why the load part, which measures, never profiles)."""
    out = tmp_path / "out"
    out.mkdir()
    args = f"--shape tiny --adapters 20 --distinct 2 --duration 2 --new 8 --streams 4 --client-procs 1 " \
           f"--frontends 1 --work {tmp_path / 'work'}"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "LOAD_ARGS": args,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_core.sh"), "profile", "none"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 streams: engine alone" in (out / "profile_none.log").read_text()
    for side in ("alone", "core"):
        tables = list((out / "profile" / side).glob("engine-*.txt"))
        assert len(tables) == 1 and "50 decode steps" in tables[0].read_text() and "by host time" in \
            tables[0].read_text(), side
