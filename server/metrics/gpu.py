"""GPU gauges: NVML readings per device (index and UUID), and this process's torch CUDA allocator.

Without a GPU, without the NVIDIA driver, or without nvidia-ml-py, the collector yields nothing at all: the
series are absent, never zeros that would read as an idle GPU. A reading that one device does not support
(power on some boards, for instance) is left out for that device only. Units: utilisation as a ratio 0..1
(NVML's percentage / 100), bytes, degrees Celsius, watts (NVML reports milliwatts).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the devices this process may use: CUDA_VISIBLE_DEVICES when it lists indices or
    UUIDs, else every device NVML sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return list(range(count))
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if all(e.isdigit() for e in entries):
        return [int(e) for e in entries if int(e) < count]
    return list(range(count))  # UUID or MIG entries: matched by UUID in NvmlCollector


class NvmlCollector(Collector):
    """``adapterd_gpu_*`` gauges per device, labelled ``index`` (NVML's, as nvidia-smi numbers them) and
    ``uuid``; ``adapterd_torch_cuda_memory_*`` for this process's allocator, labelled ``device``."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._devices: list[tuple[str, str, Any]] = []  # (index, uuid, handle)
        self._lock = threading.Lock()
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded, ImportError
            log.info("no GPU metrics: NVML unavailable (%s)", exc)
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            wanted = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            uuids = {e.strip() for e in wanted.split(",") if e.strip() and not e.strip().isdigit()}
            for index in _visible_indices(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                if uuids and not any(uuid.startswith(u) or u.startswith(uuid) for u in uuids):
                    continue
                self._devices.append((str(index), uuid, handle))
        except pynvml.NVMLError as exc:
            log.warning("no GPU metrics: NVML failed to list devices (%s)", exc)
            self._devices = []

    @property
    def available(self) -> bool:
        """Whether NVML found at least one device to report."""
        return bool(self._devices)

    def _families(self) -> dict[str, GaugeMetricFamily]:
        gpu = ["index", "uuid"]
        dev = ["device"]
        return {
            "util": GaugeMetricFamily("adapterd_gpu_utilization_ratio", "Fraction of the last sample period in "
                                      "which a kernel ran on the GPU (0..1).", labels=gpu),
            "used": GaugeMetricFamily("adapterd_gpu_memory_used_bytes", "GPU memory in use, all processes "
                                      "(bytes).", labels=gpu),
            "total": GaugeMetricFamily("adapterd_gpu_memory_total_bytes", "GPU memory installed (bytes).",
                                       labels=gpu),
            "temp": GaugeMetricFamily("adapterd_gpu_temperature_celsius", "GPU core temperature (degrees "
                                      "Celsius).", labels=gpu),
            "power": GaugeMetricFamily("adapterd_gpu_power_watts", "GPU power draw (watts).", labels=gpu),
            "alloc": GaugeMetricFamily("adapterd_torch_cuda_memory_allocated_bytes", "Memory held by this "
                                       "process's tensors, per CUDA device (bytes).", labels=dev),
            "reserved": GaugeMetricFamily("adapterd_torch_cuda_memory_reserved_bytes", "Memory reserved by this "
                                          "process's torch caching allocator, per CUDA device (bytes).",
                                          labels=dev),
            "peak": GaugeMetricFamily("adapterd_torch_cuda_memory_max_allocated_bytes", "Peak of the memory "
                                      "held by this process's tensors since start, per CUDA device (bytes).",
                                      labels=dev),
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        if not self._devices:
            return
        nv = self._nvml
        f = self._families()
        with self._lock:  # one NVML reader at a time (concurrent scrapes)
            for index, uuid, handle in self._devices:
                labels = [index, uuid]
                for key, read in (("util", lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                                  ("used", lambda h: nv.nvmlDeviceGetMemoryInfo(h).used),
                                  ("total", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total),
                                  ("temp", lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                                  ("power", lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)):
                    try:
                        f[key].add_metric(labels, float(read(handle)))
                    except nv.NVMLError:
                        continue  # not supported on this device, or a transient failure: leave it out
        self._torch_memory(f)
        yield from (family for family in f.values() if family.samples)

    @staticmethod
    def _torch_memory(f: dict[str, GaugeMetricFamily]) -> None:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for i in range(torch.cuda.device_count()):
            labels = [f"cuda:{i}"]
            f["alloc"].add_metric(labels, float(torch.cuda.memory_allocated(i)))
            f["reserved"].add_metric(labels, float(torch.cuda.memory_reserved(i)))
            f["peak"].add_metric(labels, float(torch.cuda.max_memory_allocated(i)))

    def close(self) -> None:
        """Release NVML (once; the collector yields nothing afterwards)."""
        with self._lock:
            if self._nvml is not None and self._devices is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
            self._devices = []
            self._nvml = None
