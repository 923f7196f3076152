"""Daemons for the RPC tests: a real grpc.aio server in a background thread, over loopback."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from adapterd.server.app import DaemonThread
from adapterd.server.config import ServerConfig
from tests.helpers import TEST_DEVICE


@pytest.fixture(scope="module")
def served_root(tmp_path_factory, adapter_root):
    """A private copy of the adapter root, so that tests may add, break and remove adapters."""
    root = tmp_path_factory.mktemp("served") / "adapters"
    shutil.copytree(adapter_root, root)
    return root


# For daemons that a test starts to reach something other than the engine core's process boundary (TLS, tokens,
# the RPC budgets, a trained adapter served): the engine in the test's process, as every test ran before the
# engine core had a process of its own. The engine core's start and stop cost ~12 s a daemon on the 2-core
# machine (its own torch import and model load); the module-scoped daemons of the same files, and
# tests/server/core, still serve through an engine core.
ENGINE_IN_TEST_PROCESS = {"engine_process": False}


def start_daemon(base, root, **overrides) -> DaemonThread:
    """A daemon with its engine core in its own process (as ``adapterd serve`` runs) and one front end, unless
    ``overrides`` say otherwise."""
    overrides.setdefault("frontends", 1)  # the default follows the core count: tests choose theirs
    config = ServerConfig(base=base, adapters=root, quantization=overrides.pop("quantization", "none"),
                          port=0, device=overrides.pop("device", TEST_DEVICE), dtype="float32", **overrides)
    return DaemonThread(config).start()


def engine_stats(d: DaemonThread) -> dict[str, int]:
    """Requests running and waiting in the daemon's engine, wherever it runs."""
    runtime = d.daemon.state.runtime
    stats = runtime.stats()
    return d.run(stats) if asyncio.iscoroutine(stats) else stats


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory, tiny_model_dir, adapter_root):
    """One daemon (engine core in its own process) for every module that sets ``READS_ONLY = True``: their
    tests only send requests and leave it as they found it (no adapter written, loaded or unloaded, no process
    killed, anything patched put back). Each module daemon costs ~10 s to start and stop on the 2-core machine.
    It serves its own copy of the adapter root, the same files as each module's ``served_root``."""
    root = tmp_path_factory.mktemp("shared") / "adapters"
    shutil.copytree(adapter_root, root)
    d = start_daemon(tiny_model_dir, root)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def daemon(request, tiny_model_dir, served_root):
    """The module's daemon over its ``served_root``, or the session's (``shared_daemon``) for a module that
    only reads."""
    if getattr(request.module, "READS_ONLY", False):
        yield request.getfixturevalue("shared_daemon")
        return
    d = start_daemon(tiny_model_dir, served_root)
    yield d
    d.stop()


@pytest.fixture()
def client(daemon):
    from adapterd.clients import AdapterdClient

    with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=60) as c:
        yield c
