"""The engine core in its own process, as clients and operators see it: the same tokens as the engine in the
gRPC process, and faults across the boundary (the core killed mid-stream, the daemon killed, SIGTERM)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from adapterd.server.core.process import private_dir
from tests.helpers import CLI, ENV, reference_greedy
from tests.server.test_security import _free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RESTART_S = 90  # a new core loads the tiny model in seconds; the 2-core CI machine may be busy


def _health(port: int) -> int:
    """One health check on a connection of its own (with several front ends, any of them may answer)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    """The processes ``pid`` spawned (engine core, front ends), not multiprocessing's resource tracker."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_engine_runs_in_another_process_and_gives_peft_tokens(daemon, client, tiny_model_dir, served_root):
    core = daemon.daemon.engine_process.process
    assert core.pid != os.getpid() and _alive(core.pid)
    assert Path(f"/proc/{core.pid}/comm").read_text().strip() == "adapterd-core"  # as ps and top show it
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt, adapter_id in (("hello world", ""), ("你是谁？", "lora-qv"), ("Tell me", "prefix")):
        ref = reference_greedy(tiny_model_dir, prompt, served_root / adapter_id if adapter_id else None, 8)
        reply = client.generate(prompt, adapter_id, max_new_tokens=8)
        assert reply.text == tok.decode(ref, skip_special_tokens=True), adapter_id


# The two tests below kill the module's daemon's engine core and leave it serving again (a new core), so they
# share that daemon rather than starting one each (~10 s a start on the 2-core machine).


def test_killing_the_engine_core_mid_stream_ends_the_stream_unavailable_and_the_daemon_recovers(daemon):
    port = daemon.port
    with AdapterdClient(f"127.0.0.1:{port}", timeout=120) as c:
        before = c.generate("hello world", max_new_tokens=8).text
        stream = c.generate_stream("Tell me a story", max_new_tokens=400, min_new_tokens=400)
        next(stream)  # the request runs
        old = daemon.daemon.engine_process.process.pid
        os.kill(old, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine stopped unexpectedly" in err.value.details()
        assert _wait_for(lambda: _health(port) == NOT_SERVING, 10) or _health(port) == SERVING
        assert _wait_for(lambda: _health(port) == SERVING, RESTART_S)
        new = daemon.daemon.engine_process.process.pid
        assert new != old and _alive(new)
        assert c.generate("hello world", max_new_tokens=8).text == before  # same tokens from the new core


def test_requests_while_the_engine_core_restarts_get_unavailable_not_a_hang(daemon):
    port = daemon.port
    process = daemon.daemon.engine_process.process
    process.kill()
    process.join(10)
    assert _wait_for(lambda: _health(port) == NOT_SERVING, 10)
    with AdapterdClient(f"127.0.0.1:{port}", timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello world", max_new_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _wait_for(lambda: _health(port) == SERVING, RESTART_S)


def _serve_process(tiny_model_dir, adapter_root, *flags: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root),
                             "--quantization", "none", "--device", "cpu", "--port", "0", "--grace", "20", *flags],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    match = re.search(r"listening on (\S+):(\d+)", proc.stdout.readline())
    assert match
    with AdapterdClient(f"127.0.0.1:{match[2]}") as c:
        c.wait_ready(120)
    return proc, int(match[2])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _private_dirs(pid: int) -> list[str]:
    """The socket directories process ``pid`` made (``server/core/process.py``'s ``private_dir``)."""
    return sorted(p.name.split("-")[1] for p in Path(tempfile.gettempdir()).glob(f"adapterd-*-{pid}-*"))


def test_a_killed_daemon_leaves_no_engine_process_behind_and_the_next_one_removes_its_sockets(
        tiny_model_dir, adapter_root):
    proc, _ = _serve_process(tiny_model_dir, adapter_root)
    try:
        cores = _children(proc.pid)
        assert cores, "the daemon has no engine-core process"
        assert _private_dirs(proc.pid) == ["core", "outputs"]
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: not any(_alive(pid) for pid in cores), 10), "an orphaned engine core lives on"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _private_dirs(proc.pid) == ["core", "outputs"]  # kill -9: nothing of the daemon's ran
    made = [tempfile.mkdtemp(prefix=f"adapterd-core-{os.getpid()}-")]  # a live daemon's (this process is alive)
    try:
        made += [private_dir("core"), private_dir("outputs")]  # what the next daemon's start does
        assert _private_dirs(proc.pid) == [] and Path(made[0]).is_dir()
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def test_sigterm_drains_across_the_processes_and_exits_0(tiny_model_dir, adapter_root):
    """SIGTERM to `adapterd serve`: a stream and a unary request in flight both finish with every token asked
    for, the daemon exits 0, and its engine core ends too. (tests/cli/test_cli.py's own SIGTERM test is the
    grace period's end; this one is the drain, for both kinds of call.)"""
    metrics_port = _free_port()
    proc, port = _serve_process(tiny_model_dir, adapter_root, "--metrics-port", str(metrics_port))
    cores = _children(proc.pid)
    results: list[object] = []
    replies: list[object] = []
    with AdapterdClient(f"127.0.0.1:{port}", timeout=60) as c:
        stream = c.generate_stream("Tell me a story", max_new_tokens=60, min_new_tokens=60)
        next(stream)

        def finish() -> None:
            try:
                results.append(sum(1 for _ in stream))
            except grpc.RpcError as exc:
                results.append(exc.code())

        def unary() -> None:
            with AdapterdClient(f"127.0.0.1:{port}", timeout=60) as own:
                try:
                    replies.append(own.generate("hello", max_new_tokens=300, min_new_tokens=300))
                except grpc.RpcError as exc:
                    replies.append(exc.code())

        threads = [threading.Thread(target=finish), threading.Thread(target=unary)]
        for thread in threads:
            thread.start()
        # both admitted to the engine's batch before the signal (not a fixed sleep: a loaded machine connects
        # slowly); the stream's 60 tokens may be done by then, the unary call's 300 not
        assert _wait_for(lambda: re.search(r"^adapterd_request_queue_time_seconds_count 2\.0$", _scrape(metrics_port),
                                           re.M), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for thread in threads:
            thread.join(30)
    assert results and isinstance(results[0], int), results  # the stream in flight finished
    assert replies and getattr(replies[0], "generated_token_count", None) == 300, replies
    assert _wait_for(lambda: not any(_alive(pid) for pid in cores), 10)
    assert _private_dirs(proc.pid) == []  # its sockets' directories went with it
