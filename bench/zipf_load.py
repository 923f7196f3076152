"""load_bench's Zipf sweep: many adapter ids, Poisson arrivals over gRPC, and where a phase's time went.

Each phase's latency is split with the daemon's own Prometheus histograms, read before and after the phase
from its /metrics: adapter loads (how many, mean seconds: the first contacts), queue time (submit to a
batch row) and time to first token. A Zipf p95 far above the one-adapter p95 then says whether the loads,
the queue or the steps took the time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PROMPT_TOKENS = 64
WORDS = ["hello", "world", "the", "model", "adapter"]
# (histogram, what it times) of the daemon's metrics, in the order a request meets them.
PHASE_HISTOGRAMS = (("adapterd_adapter_load_seconds", "adapter loads"),
                    ("adapterd_request_queue_time_seconds", "queue"),
                    ("adapterd_time_to_first_token_seconds", "first token"))


def make_zipf_root(root: Path, base_dir: Path, total: int, distinct: int, rank: int) -> list[str]:
    """``distinct`` real adapters (q_proj, v_proj) and ``total`` ids, the rest symlinks to the real ones."""
    from serve_bench import make_lora_dirs

    real = make_lora_dirs(root / "_files", base_dir, distinct, rank)
    ids = []
    for i in range(total):
        link = root / f"a{i:04d}"
        if not link.exists():
            link.symlink_to(root / "_files" / real[i % distinct], target_is_directory=True)
        ids.append(link.name)
    return ids


def zipf_choice(rng: random.Random, ids: list[str]) -> str:
    weights = [1.0 / (k + 1) for k in range(len(ids))]
    return rng.choices(ids, weights=weights)[0]


def arrival_plan(seed: int, rate: float, duration: float, ids: list[str], zipf: bool) -> list[tuple[float, str, str]]:
    """(seconds after the start, prompt, adapter id) of each request of one Poisson phase. The arrival times
    and prompts come from ``seed`` alone and the Zipf draws from a generator of their own, so the one-adapter
    and the Zipf phase of a rate offer the same requests at the same times and differ only in adapters (with
    a seed per phase the two offered 83 and 74 requests in 10 s, and "Zipf over one" read 0.90 of the
    arrivals, not of the server)."""
    arrivals, adapters = random.Random(seed), random.Random(seed + 1_000_003)
    plan, t = [], 0.0
    while t < duration:
        prompt = " ".join(arrivals.choice(WORDS) for _ in range(PROMPT_TOKENS))
        plan.append((t, prompt, zipf_choice(adapters, ids) if zipf else ids[0]))
        t += arrivals.expovariate(rate)
    return plan


def _poisson_proc(target: str, ids: list[str], zipf: bool, rate: float, duration: float, new: int, seed: int,
                  out: mp.Queue) -> None:
    """A client process: ``arrival_plan``'s requests over gRPC, each sent at its time (not after a sleep
    that the previous send delayed); each waits for its adapter (loaded on first use)."""
    from adapterd.clients import AsyncAdapterdClient

    async def main() -> dict[str, float]:
        latencies: list[float] = []
        tokens = 0
        async with AsyncAdapterdClient(target, timeout=600) as client:
            await client.model_info()

            async def one(prompt: str, adapter_id: str) -> None:
                nonlocal tokens
                t = time.perf_counter()
                reply = await client.generate(prompt, adapter_id, max_new_tokens=new, min_new_tokens=new)
                tokens += reply.generated_token_count
                latencies.append(time.perf_counter() - t)

            start = time.perf_counter()
            tasks = []
            for at, prompt, adapter_id in arrival_plan(seed, rate, duration, ids, zipf):
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(one(prompt, adapter_id)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
        lat = sorted(latencies)
        return {"requests": len(lat), "tok_s": tokens / wall, "p50": statistics.median(lat) * 1000,
                "p95": lat[int(0.95 * (len(lat) - 1))] * 1000}

    out.put(asyncio.run(main()))


def in_client_process(fn: Callable[..., None], args: tuple, timeout: float) -> Any:
    """``fn(*args, out)`` in a spawned process of its own, as a user's client runs (never beside the daemon's
    first front end, which runs in the bench's process); what it puts on ``out``."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, out))
    proc.start()
    result = out.get(timeout=timeout)
    proc.join()
    return result


def poisson_load(target: str, ids: list[str], zipf: bool, rate: float, duration: float, new: int,
                 seed: int) -> dict[str, float]:
    return in_client_process(_poisson_proc, (target, ids, zipf, rate, duration, new, seed), duration + 900)


# Concurrent requests of each warm-up burst: every decode and prefill batch bucket up to 16 rows
# (server/engine/decode_step.py's BATCH_BUCKETS), more than a Poisson phase at 8/s ever has at once.
BURSTS = (1, 2, 3, 4, 6, 8, 12, 16)


def _burst_proc(target: str, adapter_id: str, new: int, out: mp.Queue) -> None:
    """A client process: for each of ``BURSTS``, that many requests on ``adapter_id`` sent at once."""
    from adapterd.clients import AsyncAdapterdClient

    async def main() -> int:
        rng = random.Random(3)
        async with AsyncAdapterdClient(target, timeout=600) as client:
            for n in BURSTS:
                prompts = [" ".join(rng.choice(WORDS) for _ in range(PROMPT_TOKENS)) for _ in range(n)]
                await asyncio.gather(*(client.generate(p, adapter_id, max_new_tokens=new, min_new_tokens=new)
                                       for p in prompts))
        return len(BURSTS)

    out.put(asyncio.run(main()))


def warm_shapes(target: str, adapter_id: str, new: int) -> None:
    """Before a sweep: the batch shapes its phases meet, on one adapter, so that CUDA graphs of a shape first
    met are captured here and not inside a measured phase. Each capture stops the engine for ~0.25 s (7B on an
    H200) and every request in flight waits it out: at d8ee0b9 the Zipf phase met 3 new shapes (784 ms of
    captures) and the one-adapter phase 2 (512 ms), which a daemon that has served a while has long captured.
    The Zipf phase's first-contact adapter loads stay in the measurement (no Zipf adapter is touched here)."""
    in_client_process(_burst_proc, (target, adapter_id, new), 900)


def histogram_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each of ``PHASE_HISTOGRAMS``, over all its label sets, from /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=30) as reply:
        text = reply.read().decode()
    totals = {name: (0.0, 0.0) for name, _ in PHASE_HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        if family.name not in totals:
            continue
        for sample in family.samples:
            total, count = totals[family.name]
            if sample.name == family.name + "_sum":
                totals[family.name] = (total + sample.value, count)
            elif sample.name == family.name + "_count":
                totals[family.name] = (total, count + sample.value)
    return totals


def describe_phase(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    """'12 adapter loads (mean 31 ms), 80 queue (mean 2 ms), ...' for the requests between two readings."""
    parts = []
    for name, label in PHASE_HISTOGRAMS:
        total, count = (a - b for a, b in zip(after[name], before[name], strict=True))
        parts.append(f"{count:.0f} {label} (mean {total / count * 1000:.1f} ms)" if count else f"0 {label}")
    return ", ".join(parts)
