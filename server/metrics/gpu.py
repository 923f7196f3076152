"""GPU gauges: NVML readings per device (index and UUID), and this process's torch CUDA allocator.

The readings come from ``common.nvml`` (the trainer's status.json reads the same): without a GPU, without
the NVIDIA driver, or without nvidia-ml-py, the collector yields nothing at all: the series are absent, never
zeros that would read as an idle GPU. A reading that one device does not support (power on some boards, for
instance) is left out for that device only. Units: utilisation as a ratio 0..1, bytes, degrees Celsius, watts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...common.nvml import Nvml

# common.nvml.GpuReading's fields -> the gauge each fills
_GAUGES = {"utilization": "util", "memory_used_bytes": "used", "memory_total_bytes": "total",
           "temperature_celsius": "temp", "power_watts": "power"}


class NvmlCollector(Collector):
    """``adapterd_gpu_*`` gauges per device, labelled ``index`` (NVML's, as nvidia-smi numbers them) and
    ``uuid``; ``adapterd_torch_cuda_memory_*`` for this process's allocator, labelled ``device``."""

    def __init__(self) -> None:
        self._nvml = Nvml()

    @property
    def available(self) -> bool:
        """Whether NVML found at least one device to report."""
        return bool(self._nvml.gpus)

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
        if not self._nvml.gpus:
            return
        f = self._families()
        for gpu in self._nvml.gpus:
            reading = self._nvml.read(gpu)
            for name, family in _GAUGES.items():
                value = getattr(reading, name)
                if value is not None:
                    f[family].add_metric([str(gpu.index), gpu.uuid], float(value))
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
        self._nvml.close()
