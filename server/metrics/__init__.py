"""Prometheus metrics for the daemon: request, adapter, GPU and training series under ``adapterd_``, served
on ``/metrics`` by ``DaemonMetrics.start_http`` (see ``daemon.py``; names in ``definitions.py``,
``collectors.py`` and ``gpu.py``)."""

from .daemon import DaemonMetrics
from .labels import AdapterLabels

__all__ = ["AdapterLabels", "DaemonMetrics"]
