"""The daemon around the service: health, reflection, loading state, queue limits, graceful drain."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from adapterd.clients import AdapterdClient
from adapterd.server.app import DaemonThread
from adapterd.server.config import ServerConfig
from tests.helpers import TEST_DEVICE
from tests.server.conftest import engine_stats, start_daemon

# The module's ``daemon`` is the session's shared one (tests/server/conftest.py): the tests that stop a daemon
# start their own.
READS_ONLY = True


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_not_serving_until_the_model_is_loaded(tiny_model_dir, served_root):
    d = DaemonThread(ServerConfig(base=tiny_model_dir, adapters=served_root, quantization="none", port=0,
                                  device=TEST_DEVICE, dtype="float32"))
    d.start(load=False)
    try:
        assert health_status(d.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with AdapterdClient(f"127.0.0.1:{d.port}") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate("hi")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            d.run(d.daemon.load())
            assert health_status(d.port) == health_pb2.HealthCheckResponse.SERVING
            assert health_status(d.port, "adapterd.v1.Adapterd") == health_pb2.HealthCheckResponse.SERVING
            assert c.generate("hi", max_new_tokens=3).generated_token_count == 3
    finally:
        d.stop()


def test_reflection_lists_and_describes_the_service(daemon):
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"adapterd.v1.Adapterd", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName("adapterd.v1.Adapterd")
        methods = {m.name for m in service.methods}
        assert {"Generate", "GenerateStream", "ListAdapters", "LoadAdapter", "UnloadAdapter", "ModelInfo",
                "Tokenize", "MergeAdapter", "TrainStatus"} <= methods
        assert "stopping" in {f.name for f in pool.FindMessageTypeByName("adapterd.v1.GenerateRequest").fields}


def test_full_queue_is_resource_exhausted_and_others_are_served(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root, max_batch_size=1, max_queue=1)
    try:
        target = f"127.0.0.1:{d.port}"
        errors: list[grpc.StatusCode] = []
        done: list[int] = []

        def call():
            with AdapterdClient(target, timeout=120) as c:
                try:
                    done.append(c.generate("hello", max_new_tokens=200, min_new_tokens=200).generated_token_count)
                except grpc.RpcError as exc:
                    errors.append(exc.code())

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in errors
        assert set(errors) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert done and all(n == 200 for n in done)
        with AdapterdClient(target) as c:
            assert c.generate("hi", max_new_tokens=2).generated_token_count == 2
    finally:
        d.stop()


def test_shutdown_drains_requests_in_flight_and_refuses_new_ones(tiny_model_dir, served_root):
    d = start_daemon(tiny_model_dir, served_root)
    target = f"127.0.0.1:{d.port}"
    result: dict[str, object] = {}

    def long_call():
        with AdapterdClient(target, timeout=60) as c:
            result["reply"] = c.generate("hello", "lora-qv", max_new_tokens=300, min_new_tokens=300)

    t = threading.Thread(target=long_call)
    t.start()
    deadline = time.monotonic() + 10
    while engine_stats(d)["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    d.daemon.state.draining = True  # what SIGTERM does first (then health NOT_SERVING, then drain)
    with AdapterdClient(target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    d.stop(grace=30)
    t.join(30)
    assert result["reply"].generated_token_count == 300
