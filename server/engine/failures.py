"""Telling a row's failure from the device's, and the engine's broken state.

A row's bad data (non-finite logits from its adapter, sampling parameters that break a distribution) ends
that row alone. A device failure other than running out of memory (a device-side assert, an illegal memory
access, a lost context) leaves the CUDA context unusable for every later call: the engine then stops serving
and says so, so that health turns NOT_SERVING and the daemon exits for its supervisor to restart it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Words of the errors the CUDA (and ROCm) runtime and its libraries raise once a context is unusable.
_DEVICE_ERROR_MARKS = ("CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
                       "CUBLAS_STATUS", "CUDNN_STATUS", "HIP error", "an illegal instruction")


def is_device_failure(exc: BaseException, device: torch.device | None = None) -> bool:
    """Whether ``exc`` means the device cannot serve any more (out of memory does not: it passes).

    On a CUDA device a failure the words do not name is also checked by synchronizing: an unusable context
    raises there too."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _DEVICE_ERROR_MARKS):
        return True
    if device is not None and device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - any failure to synchronize means the context is gone
            return True
    return False


def nonfinite_message(adapter_id: str | None) -> str:
    who = f"adapter {adapter_id!r}" if adapter_id else "the base model"
    return (f"{who} produced non-finite values (NaN or inf) for this request; it was ended, other requests "
            "were not affected")


class Breakage:
    """The engine's broken state: set once, with a reason; listeners hear it once, on the thread that broke."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    def listen(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` when the engine breaks (at once if it already has)."""
        with self._lock:
            reason = self.reason
            if reason is None:
                self._listeners.append(listener)
        if reason is not None:
            listener(reason)

    def set(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            listeners, self._listeners = self._listeners, []
        log.error("the engine cannot serve any more: %s", reason)
        for listener in listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001 - one listener failing must not keep the others from hearing
                log.exception("a listener of the engine's breakage failed")
