"""Issue 12, items 1 and 2, over gRPC: one tenant's adapter or parameters cannot change, stall or end another
tenant's generation, and health tells the truth when the engine cannot serve.

The oracle for "innocent rows unchanged": each innocent request's answer when it is served alone. Runs on
TEST_DEVICE (ADAPTERD_TEST_DEVICE=cuda on a GPU, with CUDA graphs and the fused kernels on).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from adapterd.clients import AdapterdClient
from adapterd.server.adapters.ids import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.app import SERVICE_NAME
from tests.server.conftest import start_daemon

NEW_TOKENS = 12
INNOCENT = [("hello world", ""), ("你是谁？", "lora-qv"), ("one two three four", "team/lora-all"),
            ("Tell me a story", "prefix"), ("What is 2 + 2?", ""), ("hello world", "lora-rs"),
            ("你是谁？", "prefix-proj"), ("Tell me about the sea", "")]
BASE_ONLY = [(f"{prompt} {i}", "") for i, (prompt, _) in enumerate(INNOCENT)]


def _poisoned_copy(root, source: str, name: str, edit_tensors=None, edit_config=None) -> str:
    """``root/poison/name``: a copy of adapter ``source`` with its tensors and/or config edited."""
    out = root / "poison" / name
    shutil.copytree(root / source, out)
    if edit_tensors is not None:
        tensors = load_file(out / WEIGHTS_FILE)
        edit_tensors(tensors)
        save_file(tensors, out / WEIGHTS_FILE)
    if edit_config is not None:
        config = json.loads((out / CONFIG_FILE).read_text())
        edit_config(config)
        (out / CONFIG_FILE).write_text(json.dumps(config))  # json writes NaN as the bare token NaN
    return f"poison/{name}"


def _first(tensors, part: str, value: float, everywhere: bool = False) -> None:
    key = sorted(k for k in tensors if part in k)[0]
    if everywhere:
        tensors[key].fill_(value)
    else:
        tensors[key].view(-1)[0] = value


POISONS = {
    "nan-lora-b": ("lora-qv", lambda t: _first(t, "lora_B", float("nan")), None),
    "inf-lora-a": ("lora-qv", lambda t: _first(t, "lora_A", float("inf")), None),
    "nan-alpha": ("lora-qv", None, lambda c: c.update(lora_alpha=float("nan"))),
    "nan-prefix": ("prefix", lambda t: _first(t, "prompt_embeddings", float("nan")), None),
}
# Finite everywhere, also scaled (x 4) in fp32, but the forward overflows (a sum of such products is past
# fp32's 3.4e38): it loads, and its row ends alone.
OVERFLOW = ("lora-qv", lambda t: _first(t, "lora_B", 8e37, everywhere=True), None)


@pytest.fixture(scope="module")
def poisoned_root(served_root):
    ids = {name: _poisoned_copy(served_root, *spec[:1], name, *spec[1:]) for name, spec in POISONS.items()}
    ids["overflow"] = _poisoned_copy(served_root, OVERFLOW[0], "overflow", *OVERFLOW[1:])
    return served_root, ids


@pytest.fixture(scope="module")
def iso_daemon(tiny_model_dir, poisoned_root):
    # 4 LoRA slots: a batch of a few LoRA rows already reads every slot (the dense LoRA path).
    d = start_daemon(tiny_model_dir, poisoned_root[0], lora_slots=4)
    yield d
    d.stop()


def _answer(client: AdapterdClient, prompt: str, adapter_id: str) -> tuple:
    r = client.generate(prompt, adapter_id, max_new_tokens=NEW_TOKENS)
    return r.text, r.generated_token_count, r.stop_reason


def _together(port: int, jobs: list[tuple[str, str]]) -> list:
    """All jobs at once (one client each), released together so that they share batches: each result is
    the answer tuple or the RpcError."""
    results: list = [None] * len(jobs)
    go = threading.Barrier(len(jobs))

    def run(i: int, prompt: str, adapter_id: str) -> None:
        with AdapterdClient(f"127.0.0.1:{port}", timeout=120) as c:
            go.wait()
            try:
                results[i] = _answer(c, prompt, adapter_id)
            except grpc.RpcError as exc:
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


@pytest.fixture(scope="module")
def solo(iso_daemon) -> dict:
    with AdapterdClient(f"127.0.0.1:{iso_daemon.port}", timeout=120) as c:
        return {job: _answer(c, *job) for job in INNOCENT + BASE_ONLY}


@pytest.mark.parametrize("poison", [*POISONS, "overflow"])
def test_a_poisoned_adapter_touches_no_other_row(iso_daemon, poisoned_root, solo, poison):
    bad_id = poisoned_root[1][poison]
    results = _together(iso_daemon.port, [("Tell me about the sea", bad_id), *INNOCENT])
    assert results[1:] == [solo[job] for job in INNOCENT]
    bad = results[0]
    assert isinstance(bad, grpc.RpcError), bad
    assert bad.code() == grpc.StatusCode.FAILED_PRECONDITION, bad.details()
    words = {"overflow": "non-finite values", "nan-alpha": "non-finite scaling", "inf-lora-a": "infinite"}.get(
        poison, "NaN")
    assert words in bad.details(), bad.details()
    with AdapterdClient(f"127.0.0.1:{iso_daemon.port}", timeout=60) as c:
        if poison == "overflow":  # it loaded (finite weights): unload it like an operator would
            c.unload_adapter(bad_id)
    # later batches, after the bad adapter is gone: still every request's solo answer
    assert _together(iso_daemon.port, BASE_ONLY) == [solo[job] for job in BASE_ONLY]
    assert _together(iso_daemon.port, INNOCENT) == [solo[job] for job in INNOCENT]


@pytest.mark.parametrize("field,value", [("temperature", 1e-45), ("repetition_penalty", 1e-45)])
def test_extreme_sampling_values_are_refused_naming_the_field(iso_daemon, field, value):
    with AdapterdClient(f"127.0.0.1:{iso_daemon.port}", timeout=60) as c:
        kwargs = {field: value, "seed": 1} | ({"temperature": 1.0} if field != "temperature" else {})
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello", max_new_tokens=4, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sampling.{field}" in err.value.details()


def _health(port: int) -> list[int]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return [stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                for name in ("", SERVICE_NAME)]


class _Died(BaseException):
    """Not an Exception: nothing in the loop catches it, as with an error that kills the thread."""


@pytest.mark.parametrize("failure", ["device-side assert", "thread died"])
def test_an_engine_that_cannot_serve_turns_health_not_serving(tiny_model_dir, served_root, failure):
    d = start_daemon(tiny_model_dir, served_root, engine_process=False)  # the failure is injected in the engine
    try:
        engine = d.daemon.state.runtime.engine
        assert _health(d.port) == [health_pb2.HealthCheckResponse.SERVING] * 2

        def broken(*args, **kwargs):
            if failure == "thread died":
                raise _Died()
            # what a CUDA device-side assert raises; the context is unusable afterwards
            raise getattr(torch, "AcceleratorError", RuntimeError)(
                "CUDA error: device-side assert triggered")

        engine.runner.decoder.run = broken
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate("hello", max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for _ in range(50):  # health is updated on the event loop, just after the engine breaks
                if _health(d.port) == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2:
                    break
                threading.Event().wait(0.1)
            assert _health(d.port) == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
            assert d.daemon.engine_broken.is_set()
            with pytest.raises(grpc.RpcError) as err:
                c.generate("hello", max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        d.stop()


# `adapterd serve` with the device failing under the first request (what an illegal memory access raises).
# Loaded at start-up by every Python process of the daemon (it is ``sitecustomize`` on PYTHONPATH), so that
# the engine core, a process of its own, fails as a lost CUDA context makes a step fail. The front end gives up
# after one restart instead of five: each restart is a core start (a torch import and a model load, 20-30 s on
# the busy 2-core machine); tests/server/core/test_restart_policy.py holds the count of five and the pauses.
_FAILING_STEP = """
from adapterd.server.core import process
from adapterd.server.engine.engine import Engine
process.MAX_RESTARTS = %d
real_step = Engine._step
def step(self):
    if self.waiting:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    real_step(self)
Engine._step = step
"""
RESTARTS = 1


def _serves_before_it_exits(client: AdapterdClient, proc: subprocess.Popen, seconds: float) -> bool:
    """True once a new core serves; False as soon as the daemon has exited (waiting on for a health check that
    can no longer come cost 120 s a run)."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            client.wait_ready(1)
            return True
        except (TimeoutError, grpc.RpcError):
            continue
    return False


def _until_not_serving(client: AdapterdClient, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if client.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != 1:  # 1: SERVING
                return
        except grpc.RpcError:
            return
        time.sleep(0.02)


@pytest.mark.slow  # a real `adapterd serve`, whose engine core is started twice
def test_a_device_failure_restarts_the_engine_core_until_it_keeps_failing_then_serve_exits_1(
        tiny_model_dir, served_root, tmp_path):
    """A device failure ends the request with UNAVAILABLE and the engine core, which the daemon starts again
    (health NOT_SERVING, then SERVING: a fresh CUDA context). A core that fails again each time it serves
    makes `adapterd serve` exit 1 after its restarts in a row (five; here one, see ``_FAILING_STEP``), so that a
    supervisor restarts the daemon (instead of answering UNAVAILABLE forever)."""
    from tests.helpers import TEST_DEVICE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAILING_STEP % RESTARTS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    safe_path = ["-P"] if sys.flags.safe_path else []  # as this process: the repo's folders must not shadow
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall the daemon
    with log.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, *safe_path, "-m", "adapterd.cli", "serve", "--base",
                                 str(tiny_model_dir), "--adapters", str(served_root), "--quantization", "none",
                                 "--device", TEST_DEVICE, "--dtype", "float32", "--host", "127.0.0.1", "--port",
                                 str(port), "--grace", "5", "--frontends", "1"], stdout=subprocess.DEVNULL,
                                stderr=log_file, env=env)
    try:
        failures = 0
        with AdapterdClient(f"127.0.0.1:{port}", timeout=30) as c:
            while _serves_before_it_exits(c, proc, 120):  # a new core serves
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("hello", max_new_tokens=4)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                failures += 1
                assert failures <= RESTARTS + 2, log.read_text()[-3000:]
                _until_not_serving(c, 30)  # the front end has seen this core end
        assert proc.wait(60) == 1
        assert failures == RESTARTS + 1  # the first core and its restarts
        text = log.read_text()
        assert text.count("starting a new one") == RESTARTS and "the engine cannot serve any more" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
