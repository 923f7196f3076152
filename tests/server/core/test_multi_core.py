"""One daemon, two engine cores (``--device cpu,cpu``; ``cuda:0,cuda:1`` on a GPU host) behind one port: PEFT's
tokens on either core, an adapter's requests on its one core, spill-over under imbalance, per-core metrics, and
one core killed mid-stream (its requests alone end UNAVAILABLE, its adapters served by the other meanwhile,
health SERVING throughout, the core back)."""

from __future__ import annotations

import os
import signal
import urllib.request

import grpc
import pytest
from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from adapterd.server.adapters.store import ON_DISK
from adapterd.server.core.router import CoreRouter, rendezvous_score
from adapterd.v1 import adapterd_pb2 as pb
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.conftest import start_daemon
from tests.server.core.test_engine_process import NOT_SERVING, RESTART_S, SERVING, _alive, _health, _wait_for

DEVICES = "cuda:0,cuda:1" if TEST_DEVICE.startswith("cuda") else "cpu,cpu"
ADAPTERS = ("lora-qv", "team/lora-all", "lora-rs", "prefix")
NEW = 8


def _home(adapter_id: str) -> int:
    return max((0, 1), key=lambda i: rendezvous_score(adapter_id, i))


def _on(core: int) -> str:
    return next(a for a in ADAPTERS if _home(a) == core)


def _router(d) -> CoreRouter:
    router = d.daemon.state.runtime
    assert isinstance(router, CoreRouter)
    return router


def _expected(tiny_model_dir, root, prompt: str, adapter_id: str, new: int = NEW) -> str:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok.decode(reference_greedy(tiny_model_dir, prompt, root / adapter_id, new), skip_special_tokens=True)


@pytest.fixture(scope="module")
def two(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, device=DEVICES, metrics_port=0)
    yield d
    d.stop()


def test_both_cores_give_peft_tokens_and_an_adapter_stays_on_its_core(two, tiny_model_dir, served_root):
    router = _router(two)
    assert len(two.daemon.engine_processes) == 2
    with AdapterdClient(f"127.0.0.1:{two.port}", timeout=60) as c:
        assert c.model_info().device == DEVICES
        for adapter_id in (_on(0), _on(1)):
            before = list(router.routed)
            for _ in range(2):
                assert c.generate("你是谁？", adapter_id, max_new_tokens=NEW).text == \
                    _expected(tiny_model_dir, served_root, "你是谁？", adapter_id)
            home = _home(adapter_id)
            assert router.routed[home] - before[home] == 2 and router.routed[1 - home] == before[1 - home]
            # its weights were loaded on its core only: the other device's slots are left to its own adapters
            other = two.run(router.clients[1 - home].list_adapters())
            assert next(r for r in other if r.adapter_id == adapter_id).state == ON_DISK
            listed = {a.adapter_id: a.state for a in c.list_adapters()}
            assert listed[adapter_id] != pb.ON_DISK  # the one listing shows the most resident state


def test_a_core_too_far_ahead_spills_over_with_the_same_tokens(two, tiny_model_dir, served_root):
    router = _router(two)
    router.spill_threshold = 1  # the default (8) needs more streams than a 2-core CI machine runs in seconds
    adapter_id = _on(0)
    spills_before = list(router.spills)
    try:
        with AdapterdClient(f"127.0.0.1:{two.port}", timeout=60) as c:
            streams = [c.generate_stream("Tell me", adapter_id, max_new_tokens=40, min_new_tokens=40)
                       for _ in range(2)]
            for stream in streams:
                next(stream)  # both run on core 0: it is now 2 ahead of core 1
            assert router.in_flight == [2, 0]
            spilled = c.generate("你是谁？", adapter_id, max_new_tokens=NEW).text
            for stream in streams:
                list(stream)
    finally:
        router.spill_threshold = 8
    assert router.spills[1] == spills_before[1] + 1
    assert spilled == _expected(tiny_model_dir, served_root, "你是谁？", adapter_id)


def test_metrics_are_one_view_labelled_by_core(two):
    with AdapterdClient(f"127.0.0.1:{two.port}", timeout=60) as c:
        c.generate("hello world", max_new_tokens=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{two.daemon.metrics.port}/metrics", timeout=30).read().decode()
    device = DEVICES.split(",")
    for core in (0, 1):
        labels = f'core="{core}",device="{device[core]}"'
        assert f"adapterd_router_requests_total{{{labels}}}" in text
        assert f"adapterd_router_spills_total{{{labels}}}" in text
        # the core's own engine families, once per core
        assert any(line.startswith("adapterd_requests_running{") and labels in line for line in text.splitlines())
    assert text.count("# TYPE adapterd_requests_running ") == 1


@pytest.mark.slow  # a daemon of its own: two cores and two front ends start (~20 s on the 2-core CI machine)
def test_every_front_end_routes_over_both_cores(tiny_model_dir, served_root):
    from tests.server.core.test_frontends import OWN_CONNECTION

    d = start_daemon(tiny_model_dir, served_root, device=DEVICES, frontends=2, metrics_port=0)
    try:
        wanted = {a: _expected(tiny_model_dir, served_root, "你是谁？", a) for a in (_on(0), _on(1))}
        for _ in range(16):  # new connections, each placed by the kernel on one front end (P(all on one) = 2**-15)
            with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60, options=OWN_CONNECTION) as c:
                for adapter_id, text in wanted.items():
                    assert c.generate("你是谁？", adapter_id, max_new_tokens=NEW).text == text
        other = d.daemon.frontends.members[0].exposition().decode()  # front end 2's own router counters
        for core, device in enumerate(DEVICES.split(",")):
            line = f'adapterd_router_requests_total{{core="{core}",device="{device}"}} '
            assert float(other.split(line)[1].split()[0]) > 0, other
    finally:
        d.stop()


def test_killing_one_core_mid_stream_ends_only_its_requests_and_it_comes_back(two, tiny_model_dir, served_root):
    """Near the end of the module: it leaves the daemon whole again (both cores serving)."""
    router, port = _router(two), two.port
    victim, survivor = _on(0), _on(1)
    expected = _expected(tiny_model_dir, served_root, "你是谁？", victim)
    with AdapterdClient(f"127.0.0.1:{port}", timeout=120) as c:
        doomed = c.generate_stream("Tell me a story", victim, max_new_tokens=300, min_new_tokens=300)
        lives = c.generate_stream("Tell me", survivor, max_new_tokens=40, min_new_tokens=40)
        next(doomed), next(lives)
        old = two.daemon.engine_processes[0].process.pid
        os.kill(old, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            list(doomed)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine stopped unexpectedly" in err.value.details()
        assert sum(len(m.text) for m in lives) > 0  # the other core's stream ends normally
        assert _wait_for(lambda: not router.clients[0].up, 10)
        assert _health(port) == SERVING
        routed = router.routed[1]
        assert c.generate("你是谁？", victim, max_new_tokens=NEW).text == expected  # served by core 1 meanwhile
        assert router.routed[1] == routed + 1
        assert _wait_for(lambda: router.clients[0].up, RESTART_S)
        new = two.daemon.engine_processes[0].process.pid
        assert new != old and _alive(new)
        routed = router.routed[0]
        assert c.generate("你是谁？", victim, max_new_tokens=NEW).text == expected  # home again
        assert router.routed[0] == routed + 1
        assert _health(port) == SERVING


def test_with_every_core_down_health_is_not_serving_until_one_serves_again(two):
    """Last in the module too: both cores are killed, and the daemon waits for them to come back."""
    router, port = _router(two), two.port
    for process in two.daemon.engine_processes:
        os.kill(process.process.pid, signal.SIGKILL)
    assert _wait_for(lambda: _health(port) == NOT_SERVING, 10)  # a restart waits 0.5 s, then loads the model
    with AdapterdClient(f"127.0.0.1:{port}", timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello world", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _wait_for(lambda: _health(port) == SERVING, RESTART_S)
    assert _wait_for(lambda: all(client.up for client in router.clients), RESTART_S)
