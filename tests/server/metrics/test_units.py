"""Pieces without a model: bounded adapter labels, the GPU collector (fake NVML), the training collector."""

from __future__ import annotations

import json
import os
import sys

import pytest
from prometheus_client import CollectorRegistry, Counter

from adapterd.server.metrics.collectors import TrainingCollector
from adapterd.server.metrics.gpu import NvmlCollector
from adapterd.server.metrics.labels import BASE, OTHER, AdapterCounter, AdapterLabels
from tests.helpers import NVMLError, fake_pynvml


def test_labels_are_bounded_and_follow_use():
    labels = AdapterLabels(limit=2)
    registry = CollectorRegistry()
    counter = AdapterCounter(Counter("x_total", "x", ["adapter", "code"], registry=registry), adapter_position=0)
    labels.on_demote(counter.drop_adapter)

    def use(adapter_id: str, times: int = 1) -> None:
        for _ in range(times):
            labels.record_use(adapter_id)
            counter.inc((labels.label(adapter_id), "OK"))

    use("a", 5)
    use("b", 3)
    use("c", 2)  # no room: "c" counts as other
    assert labels.named() == {"a", "b"}
    assert labels.label("c") == OTHER and labels.label("") == BASE and labels.label(None) == BASE
    use("c", 3)  # 5 uses > 1.1 * 3 + 1: "c" takes the place of "b", whose series go
    assert labels.named() == {"a", "c"}
    names = {s.labels["adapter"] for m in registry.collect() for s in m.samples if s.name == "x_total"}
    assert names == {"a", "c", OTHER}
    # uses 1..4 of "c" went to "other"; the 5th, which promoted it, has its own series
    assert registry.get_sample_value("x_total", {"adapter": OTHER, "code": "OK"}) == 4
    assert registry.get_sample_value("x_total", {"adapter": "c", "code": "OK"}) == 1
    for i in range(100):  # many distinct ids: still at most limit + "other" label values
        use(f"id-{i}")
    names = {s.labels["adapter"] for m in registry.collect() for s in m.samples if s.name == "x_total"}
    assert len(names) <= 3
    labels.record_use("other")  # reserved value: never a name of its own
    assert "other" not in labels.named()


def test_labels_limit_zero_names_nothing():
    labels = AdapterLabels(limit=0)
    labels.record_use("a")
    assert labels.label("a") == OTHER


def _collect(collector) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}


def test_gpu_collector_units_and_labels(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_power=True))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    collector = NvmlCollector()
    got = _collect(collector)
    dev0 = (("index", "0"), ("uuid", "GPU-0"))
    assert got[("adapterd_gpu_utilization_ratio", dev0)] == pytest.approx(0.87)
    assert got[("adapterd_gpu_memory_used_bytes", dev0)] == 3 * 2**30
    assert got[("adapterd_gpu_memory_total_bytes", dev0)] == 80 * 2**30
    assert got[("adapterd_gpu_temperature_celsius", dev0)] == 61
    assert got[("adapterd_gpu_power_watts", dev0)] == pytest.approx(250.5)
    # A reading the device does not support is absent for that device only.
    assert ("adapterd_gpu_power_watts", (("index", "1"), ("uuid", "GPU-1"))) not in got
    assert ("adapterd_gpu_temperature_celsius", (("index", "1"), ("uuid", "GPU-1"))) in got
    collector.close()
    assert _collect(collector) == {}


def test_gpu_collector_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_power=False))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    got = _collect(NvmlCollector())
    assert {dict(labels)["index"] for _, labels in got if "index" in dict(labels)} == {"1"}


def test_gpu_collector_without_nvml_yields_nothing(monkeypatch):
    nv = fake_pynvml(fail_power=False)

    def no_library():
        raise NVMLError("NVML Shared Library Not Found")
    nv.nvmlInit = no_library
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    collector = NvmlCollector()
    assert not collector.available
    assert list(collector.collect()) == []
    assert {m.name for m in collector.describe()} >= {"adapterd_gpu_utilization_ratio", "adapterd_gpu_power_watts"}


def test_training_collector_skips_unknown_values(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "status.json").write_text(json.dumps(
        {"state": "weird", "step": 3, "total_steps": "many", "loss": None}))
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "status.json").write_text("{truncated")
    got = _collect(TrainingCollector(tmp_path))
    assert got[("adapterd_training_step", (("run_id", "r1"),))] == 3
    assert got[("adapterd_training_state", (("run_id", "r1"), ("state", "unknown")))] == 1
    assert not any(name == "adapterd_training_total_steps" for name, _ in got)
    assert not any(dict(labels).get("run_id") == "r2" for _, labels in got)
    assert list(TrainingCollector(None).collect()) == []
    assert list(TrainingCollector(tmp_path / "missing").collect()) == []


def test_training_collector_reports_a_dead_trainer_as_failed(tmp_path):
    """status.json still says running, but its trainer is gone (kill -9): the scrape says failed, and records
    it, as TrainStatus would."""
    from adapterd.trainer.status import process_start

    dead = {"state": "running", "step": 3, "total_steps": 10, "pid": 2 ** 22 + 1, "pid_start": 1}
    live = {**dead, "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    for run_id, status in (("dead", dead), ("live", live)):
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "status.json").write_text(json.dumps(status))
    got = _collect(TrainingCollector(tmp_path))
    assert got[("adapterd_training_state", (("run_id", "dead"), ("state", "failed")))] == 1
    assert got[("adapterd_training_state", (("run_id", "dead"), ("state", "running")))] == 0
    assert got[("adapterd_training_state", (("run_id", "live"), ("state", "running")))] == 1
    written = json.loads((tmp_path / "dead" / "status.json").read_text())
    assert written["state"] == "failed" and "was killed" in written["error"]
