"""The last resort of SIGTERM (server/shutdown.py): when the event loop itself is blocked, in a system call or
in C code that holds the GIL, the process still ends at grace plus the margin, saying where it was stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = """
import asyncio, re, sys, time
from adapterd.server import shutdown

shutdown.SHUTDOWN_MARGIN_S = 1.0  # seconds; 10 in the daemon

async def main():
    s = shutdown.Shutdown(asyncio.get_running_loop(), grace=0.5)
    s.install()
    print("ready", flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(1000)  # the loop blocked in a system call
    else:
        re.match(r"(a|a)*b", "a" * 64)  # the loop blocked in C code holding the GIL (catastrophic backtracking)

asyncio.run(main())
"""


@pytest.mark.parametrize("blocker", ["sleep", "regex"])
def test_a_blocked_event_loop_still_exits_after_grace_and_margin(blocker):
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, blocker], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # inside the blocking call
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1 and 1.0 < elapsed < 6.0, (code, elapsed)
    stacks = proc.stderr.read()
    assert "Timeout" in stacks and "main" in stacks  # faulthandler's dump: where each thread was
