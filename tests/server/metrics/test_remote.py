"""``/metrics`` over several engine cores (``server/metrics/remote.py``): each core's series labelled by its core
and device in one family per name, the GPUs' host-wide gauges once, a lone core's series as they are, and a
core that does not answer costing its series only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapterd.server.metrics.remote import MergedRegistry

CORE = """# HELP adapterd_requests_running Requests running.
# TYPE adapterd_requests_running gauge
adapterd_requests_running {running}
# HELP adapterd_gpu_memory_used_bytes GPU memory in use.
# TYPE adapterd_gpu_memory_used_bytes gauge
adapterd_gpu_memory_used_bytes{{index="0",uuid="GPU-a"}} 100.0
adapterd_gpu_memory_used_bytes{{index="1",uuid="GPU-b"}} 200.0
"""


def _samples(registry: MergedRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    text = generate_latest(registry).decode()
    assert text.count(f"# TYPE {name} ") == 1  # one family, whatever the number of cores
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _merged(cores) -> MergedRegistry:
    local = CollectorRegistry()
    Counter("adapterd_rpc_requests", "RPCs.", registry=local).inc()
    merged = MergedRegistry(local)
    merged.engine_core = cores
    return merged


def test_each_core_is_labelled_and_the_gpus_are_read_once():
    merged = _merged(lambda: [({"core": "0", "device": "cuda:0"}, CORE.format(running=3).encode()),
                              ({"core": "1", "device": "cuda:1"}, CORE.format(running=5).encode())])
    assert sorted(_samples(merged, "adapterd_requests_running"), key=lambda s: s[0]["core"]) == [
        ({"core": "0", "device": "cuda:0"}, 3.0), ({"core": "1", "device": "cuda:1"}, 5.0)]
    assert sorted(v for _, v in _samples(merged, "adapterd_gpu_memory_used_bytes")) == [100.0, 200.0]
    assert all("core" not in labels for labels, _ in _samples(merged, "adapterd_gpu_memory_used_bytes"))
    assert _samples(merged, "adapterd_rpc_requests_total") == [({}, 1.0)]  # the front end's own


def test_a_lone_core_keeps_its_series_as_they_are():
    merged = _merged(lambda: [({}, CORE.format(running=2).encode())])
    assert _samples(merged, "adapterd_requests_running") == [({}, 2.0)]


def test_a_core_that_does_not_answer_costs_only_the_cores_series():
    def down() -> list:
        raise TimeoutError("restarting")

    assert _samples(_merged(down), "adapterd_rpc_requests_total") == [({}, 1.0)]
