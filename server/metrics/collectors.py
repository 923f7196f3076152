"""Scrape-time collectors: the adapter cache (read from the store and the engine's slot table) and training
runs (read from each run's ``status.json``). Nothing here runs on the engine thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...trainer.runlock import settle  # standard library only, like trainer.status: no torch here
from ...trainer.status import STATES as TRAINING_STATES
from ...trainer.status import STATUS_FILE, read_status, run_dirs

MAX_RUNS = 32  # the most recently updated runs are exported; older ones are left out (bounded run_id)
TIERS = ("gpu", "cpu")


class RuntimeCollector(Collector):
    """A scrape-time collector that reads a loaded runtime: nothing until ``attach``; subclasses declare their
    families in ``_families`` and fill them from the runtime in ``_fill``."""

    def __init__(self) -> None:
        self.runtime: Any = None  # set by ``attach``; until then the collector yields nothing

    def attach(self, runtime: Any) -> None:
        """Read this runtime from now on."""
        self.runtime = runtime

    def _families(self) -> tuple[Metric, ...]:
        raise NotImplementedError

    def _fill(self, runtime: Any, families: tuple[Metric, ...]) -> None:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        if self.runtime is None:
            return
        families = self._families()
        self._fill(self.runtime, families)
        yield from families


class AdapterCacheCollector(RuntimeCollector):
    """Adapters resident per tier, LoRA slot capacity and use, slot fills and evictions since start.

    Tier "gpu": adapters whose weights sit on a CUDA device (LoRA adapters in a device slot, prefix adapters
    loaded onto a CUDA device). Tier "cpu": loaded adapters held in host memory only (every loaded adapter
    when the daemon runs on the CPU).
    """

    def _families(self) -> tuple[Metric, ...]:
        return (
            GaugeMetricFamily("adapterd_adapters_resident", "Loaded adapters by tier: gpu (weights on a CUDA "
                              "device) or cpu (host memory only) (adapters).", labels=["tier"]),
            GaugeMetricFamily("adapterd_lora_slots", "LoRA slots on the compute device: how many adapters can "
                              "be resident at once (slots)."),
            GaugeMetricFamily("adapterd_lora_slots_used", "LoRA slots holding an adapter (slots)."),
            CounterMetricFamily("adapterd_lora_slot_fills", "LoRA adapters copied into a device slot (cache "
                                "misses) since start."),
            CounterMetricFamily("adapterd_adapter_evictions", "LoRA adapters pushed out of a device slot to make "
                                "room for another since start."),
            GaugeMetricFamily("adapterd_host_buffer_pool_bytes", "Host buffers that loaded adapters are read "
                              "into (page-locked on a GPU daemon): lent to a loaded adapter, or free for the "
                              "next load (bytes).", labels=["state"]),
            CounterMetricFamily("adapterd_host_buffer_pool_fallbacks", "Adapter loads past the host buffer "
                                "pool's cap, read into memory of their own instead (slower) since start."),
        )

    def _fill(self, runtime: Any, families: tuple[Metric, ...]) -> None:
        table = runtime.engine.runner.slots
        on_cuda = runtime.base.device.type == "cuda"
        resident, slots, used, fills, evictions, pool_bytes, fallbacks = families
        counts = dict.fromkeys(TIERS, 0)
        for adapter in runtime.store.loaded():
            on_device = table.resident(adapter.key) if adapter.lora is not None else adapter.prefix is not None
            counts["gpu" if on_cuda and on_device else "cpu"] += 1
        for tier in TIERS:
            resident.add_metric([tier], counts[tier])
        slots.add_metric([], table.num_slots - 1)  # slot 0 means "no adapter"
        used.add_metric([], table.resident_count())
        fills.add_metric([], table.fills)
        evictions.add_metric([], table.evictions)
        pool = runtime.store.host_pool.stats()
        pool_bytes.add_metric(["lent"], pool["lent_bytes"])
        pool_bytes.add_metric(["free"], pool["free_bytes"])
        fallbacks.add_metric([], pool["fallbacks"])


class EngineCollector(RuntimeCollector):
    """The engine's fast paths: CUDA graphs held and captured per kind (decode, prefill), and the seconds spent
    capturing them (no step runs meanwhile, so every running request waits: ~0.26 s a capture for a 7B on an
    H200; a steadily rising count means shapes keep changing), and the modules swapped for the package's own
    kernels at start-up."""

    def _families(self) -> tuple[Metric, ...]:
        return (
            GaugeMetricFamily("adapterd_cuda_graphs", "CUDA graphs held for replay, by kind (graphs).",
                              labels=["kind"]),
            CounterMetricFamily("adapterd_cuda_graph_captures", "CUDA graphs captured since start, by kind.",
                                labels=["kind"]),
            CounterMetricFamily("adapterd_cuda_graph_capture_seconds", "Time the engine spent capturing CUDA "
                                "graphs since start, by kind: no step runs meanwhile (seconds).", labels=["kind"]),
            GaugeMetricFamily("adapterd_kernel_swapped_modules", "Base model modules served by adapterd's own "
                              "kernels, by kernel (modules).", labels=["kernel"]),
        )

    def _fill(self, runtime: Any, families: tuple[Metric, ...]) -> None:
        engine = runtime.engine
        held, captures, capture_seconds, swapped = families
        for kind, step in (("decode", engine.runner.decoder), ("prefill", engine.runner.prefiller)):
            held.add_metric([kind], len(step.graphs))
            captures.add_metric([kind], step.graphs.captures)
            capture_seconds.add_metric([kind], step.graphs.capture_seconds)
        swapped.add_metric(["int8_matmul"], engine.runner.int8_kernel_layers)
        swapped.add_metric(["rms_norm"], engine.runner.fused_norms)


def _number(value: Any) -> float | None:
    """A finite float, or None (absent, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class TrainingCollector(Collector):
    """Per training run under ``runs_root`` (``runs_root/<run_id>/status.json``): step, total steps, loss,
    ETA, tokens/s and state. A field that is null in status.json (no loss yet, unknown ETA) is left out,
    never exported as 0. A run that says pending or running while its trainer is gone (``kill -9``) is
    recorded and exported as failed at this scrape, by the rule ``TrainStatus`` uses (``runlock.settle``)."""

    def __init__(self, runs_root: Path | None) -> None:
        self.runs_root = Path(runs_root) if runs_root is not None else None

    def _families(self) -> dict[str, GaugeMetricFamily]:
        labels = ["run_id"]
        return {
            "step": GaugeMetricFamily("adapterd_training_step", "Optimizer steps done.", labels=labels),
            "total_steps": GaugeMetricFamily("adapterd_training_total_steps", "Optimizer steps planned.",
                                             labels=labels),
            "loss": GaugeMetricFamily("adapterd_training_loss", "Training loss of the latest step.", labels=labels),
            "eta_seconds": GaugeMetricFamily("adapterd_training_eta_seconds", "Estimated time left (seconds).",
                                             labels=labels),
            "tokens_per_second": GaugeMetricFamily("adapterd_training_tokens_per_second", "Training throughput "
                                                   "in non-padding tokens per second.", labels=labels),
            "state": GaugeMetricFamily("adapterd_training_state", "1 for the run's current state (pending, "
                                       "running, completed, failed, stopped; 'unknown' otherwise), else 0.",
                                       labels=["run_id", "state"]),
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def _statuses(self) -> list[tuple[str, dict[str, Any]]]:
        """(run id, settled status) of the ``MAX_RUNS`` most recently updated runs, by run id."""
        if self.runs_root is None:
            return []
        found: list[tuple[float, Path]] = []
        for run_dir in run_dirs(self.runs_root):
            try:
                found.append(((run_dir / STATUS_FILE).stat().st_mtime, run_dir))
            except OSError:
                continue  # removed since it was listed
        out = []
        for _, run_dir in sorted(found, reverse=True)[:MAX_RUNS]:
            status = read_status(run_dir)
            if status is not None:
                out.append((run_dir.name, settle(run_dir, status)))
        return sorted(out, key=lambda item: item[0])

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for run_id, status in self._statuses():
            for field in ("step", "total_steps", "loss", "eta_seconds", "tokens_per_second"):
                value = _number(status.get(field))
                if value is not None:
                    families[field].add_metric([run_id], value)
            state = status.get("state")
            state = state if state in TRAINING_STATES else "unknown"
            for name in (*TRAINING_STATES, "unknown"):
                if name != "unknown" or state == "unknown":
                    families["state"].add_metric([run_id, name], 1.0 if name == state else 0.0)
        yield from (family for family in families.values() if family.samples)


class RouterCollector(Collector):
    """Where this front end sent its requests among the engine cores (``server/core/router.py``), per core
    (``core``: its index, ``device``: its ``--device`` entry): requests routed, spill-overs taken (a request
    that left its adapter's preferred core for a less loaded one), requests in flight now."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[Metric, ...]:
        labels = ["core", "device"]
        return (CounterMetricFamily("adapterd_router_requests", "Generation requests sent to each engine core.",
                                    labels=labels),
                CounterMetricFamily("adapterd_router_spills", "Requests an engine core took from an adapter "
                                    "preferred elsewhere, whose core was too far ahead (spill-over).",
                                    labels=labels),
                GaugeMetricFamily("adapterd_router_in_flight", "Generation requests running on each engine core.",
                                  labels=labels))

    def collect(self) -> Iterator[Metric]:
        routed, spills, in_flight = families = self._families()
        router = self.router
        for i, device in enumerate(router.devices):
            key = [str(i), device]
            routed.add_metric(key, router.routed[i])
            spills.add_metric(key, router.spills[i])
            in_flight.add_metric(key, router.in_flight[i])
        yield from families
