"""One ``/metrics`` for a daemon of two processes: the front end's series and the engine core's, merged.

The front end counts what it sees (RPCs, training runs, its own process); the engine core counts what the
engine does (queue and latency histograms, tokens, batch sizes, adapter loads, slots, kernels, the GPU, its
process under ``adapterd_engine_process_*``) in its own registry (``server/core/process.py``). At each scrape
the front end asks the core for its exposition, parses it with prometheus_client's own parser, and serves each
family once: the core's where the core has samples for it, the front end's otherwise (so an engine family the
front end also defines but never updates, and an RPC family the core defines but never updates, are not
doubled). A core that does not answer in time costs its series for that scrape, never the scrape. With
several front ends (``--frontends``), the others' RPC series are summed into the first one's. With several
engine cores (``--device cuda:0,cuda:1``), each core's series carry ``core`` and ``device`` labels, in one
family per name (the GPUs' own gauges, which every core reads alike, come from one core).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

FRONT_END_ONLY = frozenset({"adapterd_build_info"})  # the core's copy of the build info, set by the front end


HOST_WIDE_PREFIX = "adapterd_gpu_"  # NVML's gauges: every core reads every GPU of the host, so one core's are kept

CoreExpositions = Callable[[], list[tuple[dict[str, str], bytes]]]


class MergedRegistry(CollectorRegistry):
    """The registry ``/metrics`` serves: ``local``'s families, and those of the engine cores once set."""

    def __init__(self, local: CollectorRegistry) -> None:
        super().__init__(auto_describe=False)
        self.local = local
        # Each engine core's exposition text with the labels that tell it from the others ({} for a lone core)
        self.engine_core: CoreExpositions | None = None
        self.front_ends: Callable[[], list[bytes]] | None = None  # front ends 2..N's expositions

    def _core_families(self) -> dict[str, Metric]:
        """The cores' families, each core's samples labelled by its core (``core``, ``device``), one family per
        name; a host-wide family (the GPUs' gauges) from the first core that has it, without those labels."""
        if self.engine_core is None:
            return {}
        try:
            cores = self.engine_core()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the core is restarting
            log.warning("the engine core's metrics are missing from this scrape: %s", exc)
            return {}
        merged: dict[str, Metric] = {}
        for labels, text in cores:
            for family in text_string_to_metric_families(text.decode("utf-8")):
                if not family.samples or family.name in FRONT_END_ONLY:
                    continue
                host_wide = family.name.startswith(HOST_WIDE_PREFIX)
                if family.name in merged:
                    if not host_wide:
                        merged[family.name].samples.extend(_labelled(family, labels))
                    continue
                if not host_wide:
                    family.samples = _labelled(family, labels)
                merged[family.name] = family
        return merged

    def collect(self) -> Iterator[Metric]:
        core = self._core_families()
        local = {family.name: family for family in self.local.collect()}
        for text in self.front_ends() if self.front_ends is not None else []:
            for family in text_string_to_metric_families(text.decode("utf-8")):
                if family.name not in FRONT_END_ONLY:
                    _add(local, family)
        for family in local.values():
            if family.name not in core:
                yield family
        yield from core.values()


def _add(families: dict[str, Metric], family: Metric) -> None:
    """Sum ``family``'s samples into ``families``: another front end's counters and histogram buckets add to
    this one's, label set by label set (front ends have no gauges of their own but their process's, which
    carry the front end's number in their names)."""
    mine = families.get(family.name)
    if mine is None:
        families[family.name] = family
        return
    index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
    for sample in family.samples:
        i = index.get((sample.name, tuple(sorted(sample.labels.items()))))
        if i is None:
            mine.samples.append(sample)
        else:
            mine.samples[i] = mine.samples[i]._replace(value=mine.samples[i].value + sample.value)


def _labelled(family: Metric, labels: dict[str, str]) -> list:
    return [sample._replace(labels={**sample.labels, **labels}) for sample in family.samples] if labels \
        else list(family.samples)
