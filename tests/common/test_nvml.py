"""The one NVML reader (``common/nvml.py``) behind the daemon's GPU gauges and the trainer's status.json.

The two readers it replaces disagreed on which device is ``cuda:i``: the trainer took NVML index i whenever
CUDA_VISIBLE_DEVICES named devices by UUID (so status.json reported another job's GPU), and dropped a whole
device when one reading (temperature) was unsupported. Both tests of the trainer's monitor failed on that code.
"""

from __future__ import annotations

import sys

import pytest

from adapterd.common.nvml import Nvml
from adapterd.trainer.status import GpuMonitor
from tests.helpers import NVMLError, fake_pynvml


@pytest.fixture
def nvml(monkeypatch):
    nv = fake_pynvml(fail_power=False)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    return nv


@pytest.mark.parametrize(("visible", "indices"), [
    (None, [0, 1]),          # unset: every device, NVML's order
    ("1,0", [1, 0]),         # indices, in CUDA's order: cuda:0 is NVML 1
    ("GPU-1", [1]),          # a UUID
    ("0,7,1", [0]),          # CUDA stops at the first entry that names no device
    ("", []),                # set and empty: CUDA sees no device
])
def test_devices_are_listed_as_cuda_numbers_them(nvml, monkeypatch, visible, indices):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [gpu.index for gpu in Nvml().gpus] == indices


def test_the_trainer_reads_the_device_it_trains_on_when_cuda_names_it_by_uuid(nvml, monkeypatch):
    nvml.nvmlDeviceGetMemoryInfo = lambda h: type("Mem", (), {"used": (h + 1) * 2**30, "total": 80 * 2**30})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")
    (reading,) = GpuMonitor([0]).read()  # cuda:0 of this process is NVML device 1
    assert reading["index"] == 1 and reading["memory_used_bytes"] == 2 * 2**30


def test_an_unsupported_reading_leaves_out_that_reading_only(nvml, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def no_sensor(handle, sensor):
        raise NVMLError("not supported")
    nvml.nvmlDeviceGetTemperature = no_sensor
    (reading,) = GpuMonitor([0]).read()
    assert "temperature_celsius" not in reading
    assert reading["memory_used_bytes"] == 3 * 2**30 and reading["utilization"] == pytest.approx(0.87)
    gpu = Nvml().gpus[0]
    assert Nvml().read(gpu).power_watts == pytest.approx(250.5)  # milliwatts to watts


def test_without_nvml_there_are_no_devices_and_no_readings(nvml):
    def no_library():
        raise NVMLError("NVML Shared Library Not Found")
    nvml.nvmlInit = no_library
    assert Nvml().gpus == []
    assert GpuMonitor([0]).read() == []
