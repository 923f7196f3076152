"""The daemon's metric definitions, all in one registry of their own (one process; no multiprocess mode).

Conventions: one ``adapterd_`` prefix; base units in the name (``_seconds``, ``_bytes``, ``_celsius``,
``_watts``, ``_ratio`` for 0..1); counters end in ``_total``; label values are bounded (adapter ids go
through ``AdapterLabels``; no request ids). Series that scrape-time collectors add (adapters resident, GPU,
training) are defined in ``collectors.py`` and ``gpu.py``; ``exported_names`` lists every sample name.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.registry import Collector

from .labels import AdapterCounter

PREFIX = "adapterd_"

# Bucket bounds, in seconds unless said otherwise.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
             "info": ("_info",), "gauge": ("",), "unknown": ("",), "stateset": ("",), "gaugehistogram": ("",)}


class Metrics:
    """Every metric object the daemon updates directly, registered in ``self.registry``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Info("adapterd_build", "Version, base model and quantization of this daemon (labels "
                               "version, base_model, quantization; set once the base model has loaded).",
                               registry=r)

        # Requests, as the engine sees them.
        self.queue_time = Histogram(
            "adapterd_request_queue_time_seconds", "Time a request waited in the queue before a batch row "
            "(seconds).", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "adapterd_time_to_first_token_seconds", "Time from submission to the request's first generated "
            "token (seconds).", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "adapterd_time_per_output_token_seconds", "Mean time between a request's generated tokens after "
            "the first, one observation per request with at least two tokens (seconds).",
            buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "adapterd_e2e_request_latency_seconds", "Time from submission to the request leaving the engine, "
            "whatever the reason (seconds).", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "adapterd_prompt_tokens_total", "Prompt tokens prefilled (tokens).", registry=r)
        self.generation_tokens = Counter(
            "adapterd_generation_tokens_total", "Tokens generated and returned to clients, counted when the "
            "request ends; an end-of-sequence token is not counted (tokens).", registry=r)
        self.batch_size = Histogram(
            "adapterd_batch_size", "Rows in each decode step (rows).", buckets=BATCH_BUCKETS, registry=r)
        self.finished = AdapterCounter(Counter(
            "adapterd_generation_requests_total", "Generation requests that left the engine, by adapter "
            "(bounded: the most used N ids, the rest 'other', '__base__' for none) and finish reason.",
            ["adapter", "finished_reason"], registry=r), adapter_position=0)

        # Requests, as gRPC sees them.
        self.rpcs = AdapterCounter(Counter(
            "adapterd_rpc_requests_total", "RPCs handled, by service, method, status code and adapter "
            "(bounded as for adapterd_generation_requests_total; empty for methods without an adapter).",
            ["service", "method", "code", "adapter"], registry=r), adapter_position=3)
        self.rpc_duration = Histogram(
            "adapterd_rpc_duration_seconds", "Time from an RPC's arrival to its last response message or "
            "error (seconds).", ["service", "method"], buckets=LATENCY_BUCKETS, registry=r)

        # Adapter loads (the store's hook).
        self.adapter_loads = Counter(
            "adapterd_adapter_loads_total", "Adapters loaded from disk, by type (LORA, PREFIX_TUNING).",
            ["type"], registry=r)
        self.adapter_load_failures = Counter(
            "adapterd_adapter_load_failures_total", "Adapter loads that failed, by the status code returned.",
            ["code"], registry=r)
        self.adapter_load_time = Histogram(
            "adapterd_adapter_load_seconds", "Time to read and validate an adapter, failed loads included "
            "(seconds).", buckets=LOAD_BUCKETS, registry=r)

        # Requests running and waiting: read from the engine at scrape time (set_function).
        self.running = Gauge("adapterd_requests_running", "Requests in the running batch (requests).",
                             registry=r)
        self.waiting = Gauge("adapterd_requests_waiting", "Requests submitted and not yet admitted to the "
                             "batch (requests).", registry=r)
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        """Add a scrape-time collector (it must define ``describe``, so that its names are known)."""
        self.registry.register(collector)
        self._collectors.append(collector)

    def families(self) -> list[tuple[str, str]]:
        """(family name, type) of every adapterd metric, including collectors that emit nothing now."""
        objects: list[Collector] = [v for v in vars(self).values() if hasattr(v, "describe")]
        objects += [v.counter for v in vars(self).values() if isinstance(v, AdapterCounter)]
        objects += self._collectors
        seen: dict[str, str] = {}
        for obj in objects:
            for family in obj.describe():
                if family.name.startswith(PREFIX):
                    seen[family.name] = family.type
        return sorted(seen.items())

    def exported_names(self) -> set[str]:
        """Every sample name the daemon can expose under the prefix (``_bucket``, ``_sum``... included)."""
        return set(_sample_names(self.families()))


def _sample_names(families: Iterable[tuple[str, str]]) -> Iterable[str]:
    for name, kind in families:
        for suffix in _SUFFIXES.get(kind, ("",)):
            yield name + suffix
