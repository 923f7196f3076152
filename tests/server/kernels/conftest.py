"""The kernel tests run Triton's CPU interpreter, switched on per test (never for the whole session).

The kernel module reads TRITON_INTERPRET at each call and builds one kernel per mode (``triton.jit`` reads
the variable when it wraps the function, which happens at the first call of each mode, not at import), so
setting it around each test is enough and leaves other tests (which may run the daemon on the CPU) as they
were. Tests marked ``gpu`` run the compiled kernel on CUDA, so the variable is cleared for them.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    pytest.importorskip("triton")
    if "gpu" in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
