"""The daemon's metrics, put together: the registry, the gRPC interceptor, the engine observer, the
scrape-time collectors, and the HTTP server that serves ``/metrics`` (prometheus_client, one process).

``server/app.py`` creates a ``DaemonMetrics`` before the gRPC server (for the interceptor), starts its HTTP
server at once (so that a scrape during the model load already works), calls ``attach`` once the runtime
has loaded, and ``close`` at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import disable_created_metrics, start_http_server
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector

from ...common import __version__
from ..adapters.store import LoadedAdapter
from .collectors import AdapterCacheCollector, EngineCollector, RouterCollector, TrainingCollector
from .definitions import Metrics
from .gpu import NvmlCollector
from .interceptor import RpcMetricsInterceptor
from .labels import DEFAULT_LIMIT, AdapterLabels
from .observer import MetricsObserver
from .remote import CoreExpositions, MergedRegistry

log = logging.getLogger(__name__)


class DaemonMetrics:
    """Everything the daemon exports. ``adapter_label_limit``: how many adapter ids get their own
    ``adapter`` label value (the most used ones); ``runs_root``: training runs to report (None: none)."""

    def __init__(self, runs_root: Path | None = None, adapter_label_limit: int = DEFAULT_LIMIT,
                 gpu: bool = True, process_namespace: str = "") -> None:
        # No ``_created`` series: Prometheus's text format reads them as gauges of their own, doubling the
        # series for nothing. (A process-wide prometheus_client setting; the daemon owns its process.)
        disable_created_metrics()
        self.metrics = Metrics()
        self.labels = AdapterLabels(adapter_label_limit)
        self.labels.on_demote(self._demote)
        self.interceptor = RpcMetricsInterceptor(self.metrics, self.labels)
        self.observer = MetricsObserver(self.metrics, self.labels)
        self.adapter_cache = AdapterCacheCollector()
        self.metrics.register(self.adapter_cache)
        self.engine = EngineCollector()
        self.metrics.register(self.engine)
        self.metrics.register(TrainingCollector(runs_root))
        self.gpu = NvmlCollector() if gpu else None
        if self.gpu is not None:
            self.metrics.register(self.gpu)
        # process_cpu_seconds_total, resident memory...; the engine core's under its own namespace
        ProcessCollector(namespace=process_namespace, registry=self.metrics.registry)
        self.served = MergedRegistry(self.metrics.registry)  # what /metrics serves (remote.py)
        self.runtime: Any = None
        self.port: int | None = None
        self._httpd: Any = None
        self._http_thread: threading.Thread | None = None

    @classmethod
    def for_config(cls, config: Any, frontend_index: int = 0) -> DaemonMetrics:
        """Metrics for a daemon with this ``ServerConfig``: training runs from ``config.runs``, build info
        from its base model and quantization (refined by ``attach`` once the model has loaded). Front ends
        2..N (``frontend_index`` >= 1) count their RPCs and their process only: the first reports the rest."""
        if frontend_index:
            return cls(gpu=False, process_namespace=f"adapterd_frontend_{frontend_index}")
        metrics = cls(runs_root=config.runs, gpu=not config.engine_process)
        metrics.set_build_info(Path(config.base), config.quantization)
        return metrics

    def set_build_info(self, base_path: Path, quantization: str) -> None:
        """``adapterd_build_info``: this version, the base model's directory name, the quantization."""
        self.metrics.build_info.info({"version": __version__, "base_model": Path(base_path).name or str(base_path),
                                      "quantization": str(quantization)})

    @property
    def registry(self) -> Any:
        return self.metrics.registry

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread; returns the port."""
        self._httpd, self._http_thread = start_http_server(port, addr=host, registry=self.served)
        self.port = int(self._httpd.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def attach(self, runtime: Any) -> None:
        """Hook into a loaded runtime: engine observer, store load hook, cache collector, build info."""
        self.runtime = runtime
        m = self.metrics
        base = runtime.base
        self.set_build_info(base.path, base.quantization)
        engine = runtime.engine
        m.running.set_function(lambda: engine.stats()["running"])
        m.waiting.set_function(lambda: engine.stats()["waiting"])
        self.adapter_cache.attach(runtime)
        self.engine.attach(runtime)
        runtime.store.on_load = self.adapter_loaded
        engine.observers.add(self.observer)

    def attach_engine_core(self, info: Any, expositions: CoreExpositions) -> None:
        """Serve the engine cores' series beside this process's (remote.py); ``info``: their ModelInfo."""
        self.set_build_info(Path(info.base_model), info.quantization)
        self.served.engine_core = expositions

    def attach_router(self, router: Any) -> None:
        """Export where requests went among several engine cores (``core/router.py``)."""
        self.metrics.register(RouterCollector(router))

    def adapter_loaded(self, adapter_id: str, seconds: float, result: LoadedAdapter | BaseException) -> None:
        """The store's hook: one load attempt of ``adapter_id`` took ``seconds``, and gave ``result``."""
        m = self.metrics
        m.adapter_load_time.observe(seconds)
        if isinstance(result, BaseException):
            code = getattr(result, "code", None)
            m.adapter_load_failures.labels(getattr(code, "name", "INTERNAL")).inc()
        else:
            m.adapter_loads.labels(result.type or "UNKNOWN").inc()

    def _demote(self, adapter_id: str) -> None:
        self.metrics.finished.drop_adapter(adapter_id)
        self.metrics.rpcs.drop_adapter(adapter_id)

    def local_exposition(self) -> bytes:
        """This process's series alone (what a front end 2..N hands the first one at each scrape)."""
        return generate_latest(self.metrics.registry)

    def exposition(self) -> bytes:
        """The text a scrape of ``/metrics`` returns now (Prometheus text format 0.0.4)."""
        return generate_latest(self.served)

    def close(self) -> None:
        """Stop the HTTP server and release NVML; detaching from the engine is left to its shutdown."""
        if self._httpd is not None:
            started = time.monotonic()
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._http_thread is not None:
                self._http_thread.join(max(0.0, 5.0 - (time.monotonic() - started)))
            self._httpd = None
        if self.gpu is not None:
            self.gpu.close()
