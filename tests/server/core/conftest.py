"""Shared by the engine core's tests: a core serving an in-process runtime on the tiny model from a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from adapterd.server.core.engine_core import EngineCore
from adapterd.server.core.process import EngineProcess
from adapterd.server.engine import EngineConfig
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE


@contextlib.contextmanager
def core_in_a_thread(tiny_model_dir, adapter_root) -> Iterator[tuple[Runtime, EngineCore]]:
    """An ``EngineCore`` on a private address, its I/O thread running, over a runtime of its own (fp32, 4 rows);
    stopped and closed on the way out."""
    runtime = Runtime.load(tiny_model_dir, adapter_root, "none", EngineConfig(max_batch_size=4, max_queue=8),
                           device=TEST_DEVICE, dtype="float32")
    core = EngineCore(runtime, EngineProcess.private_address())
    thread = threading.Thread(target=core.serve, daemon=True)
    thread.start()
    try:
        yield runtime, core
    finally:
        core.stop()
        thread.join(10)
        runtime.close()
        core.close()
