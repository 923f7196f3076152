"""``adapterd serve`` as an operator runs it: its port is its own, and SIGTERM drains with health NOT_SERVING
readable by clients until the calls in flight have finished."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterd.clients import AdapterdClient
from adapterd.server.app import start_daemon
from adapterd.server.config import ServerConfig
from tests.helpers import CLI, ENV, one_line_error
from tests.server.conftest import ENGINE_IN_TEST_PROCESS
from tests.server.conftest import start_daemon as start_daemon_thread

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _serve(tiny_model_dir, adapter_root, port: str = "0", stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``adapterd serve`` on the CPU, also on a GPU machine: the drain test needs a stream that lasts about a
    second or more after SIGTERM (400 tokens: ~2 s on the 2-core machine), which CUDA graphs would shorten."""
    return subprocess.Popen([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root),
                             "--quantization", "none", "--device", "cpu", "--port", port, "--grace", "30"],
                            env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)


@pytest.fixture()
def daemon(tiny_model_dir, adapter_root) -> Iterator[tuple[subprocess.Popen, int]]:
    """A served daemon in its own process, loaded: (process, port)."""
    proc = _serve(tiny_model_dir, adapter_root)
    try:
        match = re.search(r"listening on (\S+):(\d+)", proc.stdout.readline())
        assert match
        with AdapterdClient(f"127.0.0.1:{match[2]}") as c:
            c.wait_ready(60)
        yield proc, int(match[2])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(port: int) -> int | grpc.StatusCode:
    """One health Check on a new connection: the status, or the gRPC code of its failure."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as exc:
            return exc.code()


def test_a_second_daemon_on_a_served_port_is_refused_naming_the_port(tiny_model_dir, adapter_root):
    # The first daemon only has to hold the port: one in this process, its engine here too, saves starting a
    # daemon process and its engine core (~12 s on the 2-core machine). The second is `adapterd serve`.
    first = start_daemon_thread(tiny_model_dir, adapter_root, **ENGINE_IN_TEST_PROCESS)
    try:
        port = first.port
        second = _serve(tiny_model_dir, adapter_root, str(port), stderr=subprocess.PIPE)
        try:
            out, err = second.communicate(timeout=60)  # the refused one ends; a sharing one would stay up
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate()
        refused = subprocess.CompletedProcess(second.args, second.returncode, out, err)
        assert "listening" not in out
        assert "another process" in one_line_error(refused, f"--port {port}")
        assert _health(port) == SERVING  # the first one still has its port to itself
    finally:
        first.stop()


def test_front_ends_of_our_own_share_a_port_only_when_asked(tiny_model_dir, adapter_root):
    import asyncio

    config = ServerConfig(base=tiny_model_dir, adapters=adapter_root, quantization="none", port=0)

    async def two(share: bool) -> int:
        first = await start_daemon(config, share_port=share)
        try:
            second_config = ServerConfig(base=tiny_model_dir, adapters=adapter_root, quantization="none",
                                         port=first.port)
            second = await start_daemon(second_config, share_port=share)
            await second.shutdown(0)
            return second.port
        finally:
            await first.shutdown(0)

    async def both() -> None:
        shared = await two(True)
        assert shared > 0
        with pytest.raises(RuntimeError, match="Failed to bind"):
            await two(False)

    asyncio.run(both())


def test_sigterm_health_reads_not_serving_while_a_stream_drains(daemon):
    """SIGTERM during a long stream: a health Check during the drain reads NOT_SERVING, a new Generate gets
    UNAVAILABLE, the stream ends with all its tokens, and the process exits 0."""
    proc, port = daemon
    target = f"127.0.0.1:{port}"
    started, result = threading.Event(), {}

    def stream() -> None:
        with AdapterdClient(target, timeout=120) as c:
            messages = []
            for message in c.generate_stream("hello", max_new_tokens=400, min_new_tokens=400):
                messages.append(message)
                started.set()
            result["last"] = messages[-1]
            result["ended_at"] = time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    seen: list[int | grpc.StatusCode] = []
    while (not seen or seen[-1] != NOT_SERVING) and len(seen) < 100 and "last" not in result:
        seen.append(_health(port))  # SERVING until the signal is handled
    read_at = time.monotonic()
    with AdapterdClient(target, timeout=10) as c, pytest.raises(grpc.RpcError) as refused:
        c.generate("hi", max_new_tokens=2)
    reader.join(120)
    assert proc.wait(60) == 0
    assert seen[-1] == NOT_SERVING and set(seen) <= {SERVING, NOT_SERVING}, seen
    assert read_at < result["ended_at"]  # read during the drain, not after the stream
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert result["last"].generated_token_count == 400
