"""NVML readings of the GPUs this process may use: the one reader behind the daemon's GPU gauges and the
trainer's status.json ``gpus``.

Devices are listed as CUDA numbers them for this process, so ``Nvml().gpus[i]`` is ``cuda:i``:
``CUDA_VISIBLE_DEVICES`` unset means every device NVML sees, in NVML's order; set, it lists NVML indices or
(prefixes of) device UUIDs, in the order CUDA gives them, up to the first entry that names no device (as
CUDA reads it); set and empty, it hides every device. MIG instances are not read (NVML reads them through
their parent device, not by their own UUID).

Without the NVIDIA driver, without a GPU or without nvidia-ml-py, there are no devices: readings are absent,
never zeros that would read as an idle GPU. A reading one device does not support (power on some boards) is
None for that device only. Units: utilisation as a ratio 0..1 (NVML's percentage / 100), bytes, degrees
Celsius, watts (NVML reports milliwatts). Standard library only (pynvml is optional), no torch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    """One device: ``index`` as NVML and nvidia-smi number it, its UUID, and NVML's handle."""

    index: int
    uuid: str
    handle: Any


@dataclass(frozen=True)
class GpuReading:
    """One reading of one device; None where the device does not support it (see the module docstring)."""

    utilization: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None


def visible_entries() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries, or None when it is unset (every device visible)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return [entry.strip() for entry in visible.split(",")] if visible.strip() else []


def _pick(entry: str, devices: list[Gpu]) -> Gpu | None:
    """The device an entry of CUDA_VISIBLE_DEVICES names: an NVML index, or a unique UUID prefix."""
    if entry.isdigit():
        return next((d for d in devices if d.index == int(entry)), None)
    matches = [d for d in devices if d.uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def visible_gpus(devices: list[Gpu], entries: list[str] | None) -> list[Gpu]:
    """``devices`` (every one NVML sees) as CUDA orders them for this process (see the module docstring)."""
    if entries is None:
        return list(devices)
    chosen: list[Gpu] = []
    for entry in entries:
        device = _pick(entry, devices)
        if device is None or device in chosen:
            break  # CUDA ignores an entry that names no device, and every entry after it
        chosen.append(device)
    return chosen


class Nvml:
    """NVML, initialised once per instance; ``gpus`` are the devices this process may use, as CUDA numbers
    them. ``read`` is safe from several threads (one NVML call at a time); ``close`` releases NVML."""

    def __init__(self) -> None:
        self._nv: Any = None
        self._lock = threading.Lock()
        self.gpus: list[Gpu] = []
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded, ImportError
            log.info("no GPU readings: NVML unavailable (%s)", exc)
            return
        self._nv = pynvml
        try:
            self.gpus = visible_gpus(self._all_devices(), visible_entries())
        except pynvml.NVMLError as exc:
            log.warning("no GPU readings: NVML failed to list devices (%s)", exc)

    def _all_devices(self) -> list[Gpu]:
        nv = self._nv
        devices = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(handle)
            devices.append(Gpu(index, uuid.decode() if isinstance(uuid, bytes) else str(uuid), handle))
        return devices

    def _value(self, read: Callable[[Any], float], handle: Any) -> float | None:
        try:
            return float(read(handle))
        except self._nv.NVMLError:
            return None  # not supported on this device, or a transient failure: left out

    def read(self, gpu: Gpu) -> GpuReading:
        """One reading of ``gpu`` (one of ``gpus``)."""
        nv = self._nv
        with self._lock:
            if nv is None:
                return GpuReading(None, None, None, None, None)
            util = self._value(lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0, gpu.handle)
            used = self._value(lambda h: nv.nvmlDeviceGetMemoryInfo(h).used, gpu.handle)
            total = self._value(lambda h: nv.nvmlDeviceGetMemoryInfo(h).total, gpu.handle)
            temp = self._value(lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU), gpu.handle)
            power = self._value(lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0, gpu.handle)
        return GpuReading(util, None if used is None else int(used), None if total is None else int(total),
                          temp, power)

    def close(self) -> None:
        """Release NVML (once); no devices afterwards."""
        with self._lock:
            if self._nv is not None:
                try:
                    self._nv.nvmlShutdown()
                except self._nv.NVMLError:
                    pass
            self._nv = None
            self.gpus = []
