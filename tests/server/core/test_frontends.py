"""``--frontends 2``: two gRPC front-end processes on one port feeding one engine core. Clients on any
connection get the same tokens, limits hold for the daemon as a whole, ``/metrics`` is one view, and the
front ends follow the core's faults and the daemon's stop."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from tests.helpers import reference_greedy
from tests.server.conftest import start_daemon
from tests.server.core.test_engine_process import RESTART_S, _alive, _health, _wait_for
from tests.server.test_security import _free_port

CONNECTIONS = 24  # new connections, each placed by the kernel on one front end (P(all on one) = 2**-23)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else grpc reuses one connection per target


def _client(d, **kw) -> AdapterdClient:
    return AdapterdClient(f"127.0.0.1:{d.port}", options=OWN_CONNECTION, **{"timeout": 60, **kw})


@pytest.fixture(scope="module")
def two(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, frontends=2, metrics_port=_free_port(), max_concurrent_rpcs=2)
    yield d
    if d._thread.is_alive():  # the module's last test stops it itself
        d.stop()


def _rpc_count(text: str, method: str) -> float:
    """OK calls of ``method`` in a scrape."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "adapterd_rpc_requests_total" and s.labels.get("method") == method
               and s.labels.get("code") == "OK")


def _scrape(d) -> str:
    port = d.config.metrics_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def test_every_connection_gets_peft_tokens_and_both_front_ends_serve(two, tiny_model_dir, served_root):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = reference_greedy(tiny_model_dir, "你是谁？", served_root / "lora-qv", 6)
    want = tok.decode(ref, skip_special_tokens=True)
    before = _rpc_count(_scrape(two), "Generate")
    for _ in range(CONNECTIONS):
        with _client(two) as c:  # a new connection each time
            assert c.generate("你是谁？", "lora-qv", max_new_tokens=6).text == want
    member = two.daemon.frontends.members[0]
    assert Path(f"/proc/{member.process.pid}/comm").read_text().strip() == "adapterd-fe2"  # as ps and top show it
    other = member.exposition().decode()
    served_by_other = _rpc_count(other, "Generate")
    assert 0 < served_by_other < CONNECTIONS, other  # the kernel spread the connections over both front ends
    text = _scrape(two)
    assert _rpc_count(text, "Generate") - before == CONNECTIONS  # one view: both front ends' calls counted
    assert "adapterd_frontend_1_process_cpu_seconds_total" in text and "adapterd_engine_process_cpu" in text
    assert len(re.findall(r"^adapterd_build_info\{", text, re.M)) == 1


def test_the_concurrent_rpc_limit_holds_for_the_daemon_not_per_front_end(two):
    holders = [_client(two) for _ in range(2)]
    streams = [h.generate_stream("hello", max_new_tokens=300, min_new_tokens=300) for h in holders]
    for stream in streams:
        next(stream)  # both slots of --max-concurrent-rpcs 2 are held
    try:
        for _ in range(8):
            with _client(two, timeout=30) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("hi", max_new_tokens=1)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for stream in streams:
            stream.cancel()
        for h in holders:
            h.close()
    assert _wait_for(lambda: _generate_ok(two), 10)  # the slots came back


def _generate_ok(d) -> bool:
    try:
        with _client(d, timeout=30) as c:
            return c.generate("hi", max_new_tokens=1).generated_token_count == 1
    except grpc.RpcError:
        return False


def test_both_front_ends_follow_the_engine_core_down_and_up_again(two):
    old = two.daemon.engine_process.process.pid
    os.kill(old, signal.SIGKILL)
    states: set[int] = set()
    assert _wait_for(lambda: states.add(_health(two.port)) or health_pb2.HealthCheckResponse.NOT_SERVING in states,
                     10)
    assert _wait_for(lambda: all(_health(two.port) == health_pb2.HealthCheckResponse.SERVING for _ in range(6)),
                     RESTART_S)
    assert all(_generate_ok(two) for _ in range(CONNECTIONS // 2))  # whichever front end a connection reaches


def test_a_front_end_that_dies_is_started_again(two):
    member = two.daemon.frontends.members[0]
    os.kill(member.process.pid, signal.SIGKILL)
    assert _wait_for(lambda: two.daemon.frontends.members[0].process.pid != member.process.pid
                     and _alive(two.daemon.frontends.members[0].process.pid), RESTART_S)
    assert _wait_for(lambda: all(_generate_ok(two) for _ in range(6)), 30)


def test_stopping_the_daemon_stops_every_front_end(two):
    """Last in the module: it stops the module's daemon (a daemon of its own cost ~20 s more on the 2-core
    machine)."""
    d = two
    pids = [m.process.pid for m in d.daemon.frontends.members] + [d.daemon.engine_process.process.pid]
    results: list[object] = []
    with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60) as c:
        stream = c.generate_stream("Tell me a story", max_new_tokens=40, min_new_tokens=40)
        next(stream)
        reader = threading.Thread(target=lambda: results.append(sum(1 for _ in stream)))
        reader.start()
        started = time.monotonic()
        d.stop(grace=20)
        reader.join(30)
    assert results and results[0] > 0  # the stream in flight drained
    assert time.monotonic() - started < 30
    assert not any(_alive(pid) for pid in pids)
