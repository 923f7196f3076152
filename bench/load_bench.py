"""Serving under load: many adapters with Zipf popularity, and the gRPC path against the engine alone.

1. Many adapters: ``--adapters`` ids registered (``--distinct`` real PEFT LoRA files, the rest symlinks to
   them inside the root, so every id is its own adapter to the daemon: its own load, its own slot), a bounded
   number of device slots, requests arriving as a Poisson process with adapters drawn from a Zipf(1)
   distribution; a rate sweep gives throughput and p50/p95 latency, against the same load on one adapter.
2. End to end: ``--streams`` concurrent streams from ``--client-procs`` client processes over gRPC on
   loopback, against the same number of concurrent requests submitted to the engine in-process; with
   ``--http``, the same streams over the OpenAI-compatible HTTP API too (``/v1/completions`` with server-sent
   events, through the official ``openai`` client), each answer held to ``--new`` tokens as over gRPC.

Runs on the GPU machine (``--shape llama2-7b``) or the CPU (``--shape tiny``: a regression guard, ratios
only). Appends its tables to bench/RESULTS.md with commit, date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from results_table import git_commit
from serve_bench import SHAPES, build_model_dir

PROMPT_TOKENS = 64


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


async def poisson_load(runtime, pick, rate: float, duration: float, new: int, seed: int) -> dict[str, float]:
    """Requests at ``rate``/s for ``duration`` s; each waits for its adapter (loaded on first use)."""
    from adapterd.server.engine import GenerationParams

    rng = random.Random(seed)
    params = GenerationParams(max_new_tokens=new, min_new_tokens=new)
    latencies: list[float] = []
    tokens = 0

    async def one(adapter_id: str) -> None:
        nonlocal tokens
        t = time.perf_counter()
        adapter = await runtime.adapter(adapter_id) if adapter_id else None
        prompt = [rng.randrange(10, 1000) for _ in range(PROMPT_TOKENS)]
        async for event in runtime.generate(prompt, params, adapter):
            if event.kind == "end":
                tokens += event.generated_token_count
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    tasks = []
    while time.perf_counter() - start < duration:
        tasks.append(asyncio.ensure_future(one(pick(rng))))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"requests": len(lat), "tok_s": tokens / wall, "p50": statistics.median(lat) * 1000,
            "p95": lat[int(0.95 * (len(lat) - 1))] * 1000}


async def engine_streams(runtime, streams: int, duration: float, new: int) -> float:
    """Generated tokens/s with ``streams`` requests always in flight, submitted in-process."""
    from adapterd.server.engine import GenerationParams

    params = GenerationParams(max_new_tokens=new, min_new_tokens=new)
    tokens = 0
    stop = time.perf_counter() + duration

    async def loop(i: int) -> None:
        nonlocal tokens
        rng = random.Random(i)
        while time.perf_counter() < stop:
            prompt = [rng.randrange(10, 1000) for _ in range(PROMPT_TOKENS)]
            async for event in runtime.generate(prompt, params, None):
                if event.kind == "end":
                    tokens += event.generated_token_count

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(streams)))
    return tokens / (time.perf_counter() - start)


class StepStats:
    """Decode steps seen by the engine during one phase: how full they were and how long they took."""

    def __init__(self) -> None:
        from adapterd.server.engine.observer import EngineObserver

        stats = self

        class Watch(EngineObserver):
            def decode_step(self, rows, seconds):
                stats.steps += 1
                stats.rows += len(rows)
                stats.seconds += seconds

        self.steps, self.rows, self.seconds = 0, 0, 0.0
        self.observer = Watch()

    def __str__(self) -> str:
        if not self.steps:
            return "no decode steps"
        return (f"{self.steps} decode steps, {self.rows / self.steps:.1f} rows per step, "
                f"{self.seconds / self.steps * 1000:.2f} ms per step")


def _client_proc(target: str, streams: int, duration: float, new: int, out: mp.Queue) -> None:
    """One client process: ``streams`` concurrent GenerateStream calls in a loop for ``duration`` s."""
    from adapterd.clients import AsyncAdapterdClient

    async def main() -> tuple[int, float, float]:
        tokens = 0
        stop = time.perf_counter() + duration
        async with AsyncAdapterdClient(target, timeout=600) as client:
            await client.model_info()  # connected, and the daemon answers
            began = time.time()  # after start-up and connecting: only serving time counts

            async def loop(i: int) -> None:
                nonlocal tokens
                rng = random.Random(i)
                while time.perf_counter() < stop:
                    prompt = " ".join(rng.choice(["hello", "world", "the", "model", "adapter"])
                                      for _ in range(PROMPT_TOKENS))
                    async for message in client.generate_stream(prompt, max_new_tokens=new, min_new_tokens=new):
                        if message.stop_reason:
                            tokens += message.generated_token_count
            await asyncio.gather(*(loop(i) for i in range(streams)))
        return tokens, began, time.time()

    out.put(asyncio.run(main()))


def _http_client_proc(base_url: str, model: str, streams: int, duration: float, new: int, out: mp.Queue) -> None:
    """One client process: ``streams`` concurrent streamed completions over HTTP in a loop for ``duration`` s."""
    import openai

    async def main() -> tuple[int, float, float]:
        tokens = 0
        stop = time.perf_counter() + duration
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        await client.models.list()  # connected, and the daemon answers
        began = time.time()

        async def loop(i: int) -> None:
            nonlocal tokens
            rng = random.Random(i)
            while time.perf_counter() < stop:
                prompt = " ".join(rng.choice(["hello", "world", "the", "model", "adapter"])
                                  for _ in range(PROMPT_TOKENS))
                stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0,
                                                         stream=True, stream_options={"include_usage": True},
                                                         extra_body={"min_tokens": new})
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
        await asyncio.gather(*(loop(i) for i in range(streams)))
        await client.close()
        return tokens, began, time.time()

    out.put(asyncio.run(main()))


def grpc_streams(target: str, streams: int, procs: int, duration: float, new: int) -> float:
    return client_streams(_client_proc, (target,), streams, procs, duration, new)


def http_streams(base_url: str, model: str, streams: int, procs: int, duration: float, new: int) -> float:
    return client_streams(_http_client_proc, (base_url, model), streams, procs, duration, new)


def client_streams(proc, target: tuple, streams: int, procs: int, duration: float, new: int) -> float:
    """Generated tokens/s over the span when ``procs`` client processes (each running ``proc``) were serving,
    and the tokens counted."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    workers = [ctx.Process(target=proc, args=(*target, streams // procs, duration, new, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=duration + 600) for _ in workers]
    for w in workers:
        w.join()
    # Throughput over the span when clients were serving (process start-up and imports excluded).
    span = max(end for _, _, end in results) - min(began for _, began, _ in results)
    tokens = sum(tokens for tokens, _, _ in results)
    return tokens / span, tokens


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's threads, by Python thread name; threads Python does not
    know (gRPC's C-core pollers, torch's own pools) count as "other". Linux only (/proc); {} elsewhere."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in tasks.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(task.name), "other")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> str:
    """Microseconds of CPU per streamed token for the event loop, the engine thread and the rest."""
    use = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    loop, engine = use.pop("adapterd-daemon", 0.0), use.pop("adapterd-engine", 0.0)
    rest = sum(v for k, v in use.items() if k != "MainThread")
    return (f"server CPU per token: event loop {loop / tokens * 1e6:.0f} us, engine thread "
            f"{engine / tokens * 1e6:.0f} us, other threads {rest / tokens * 1e6:.0f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "adapterd-bench"))
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--rates", default="2,4,8", help="request rates (1/s) for the Zipf sweep")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--switch-intervals-ms", default="5,0.2,0.05",
                        help="GIL switch intervals (ms) to measure the end-to-end ratio at: Python's default is 5, "
                             "the daemon's 0.2 (--gil-switch-interval-ms)")
    parser.add_argument("--http", action="store_true", help="also stream over the OpenAI-compatible HTTP API")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from adapterd.server.app import DaemonThread
    from adapterd.server.config import ServerConfig
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    root = work / f"zipf-{args.adapters}"
    ids = make_zipf_root(root, base_dir, args.adapters, args.distinct, args.rank)
    rows: list[str] = []

    base = load_base_model(base_dir, args.quantization, device=str(device))
    runtime = Runtime(base, root, EngineConfig(max_batch_size=128, lora_slots=args.slots,
                                               max_lora_rank=args.rank, max_queue=100_000))
    runtime.engine.start()
    # The daemon's GIL switch interval for the in-process points too (loads in worker threads, the engine
    # thread and this event loop share the GIL as they do in the daemon).
    sys.setswitchinterval(ServerConfig.gil_switch_interval_ms / 1000)  # the field's default
    try:
        asyncio.run(poisson_load(runtime, lambda r: ids[0], 2.0, 3.0, 4, 0))  # warm-up
        for rate in (float(r) for r in args.rates.split(",") if r):
            one = asyncio.run(poisson_load(runtime, lambda r: ids[0], rate, args.duration, args.new, 1))
            many = asyncio.run(poisson_load(runtime, lambda r: zipf_choice(r, ids), rate, args.duration,
                                            args.new, 2))
            rows.append(f"| {rate:g}/s | {one['requests']} | {one['tok_s']:.1f} | {one['p50']:.0f} / {one['p95']:.0f}"
                        f" | {many['requests']} | {many['tok_s']:.1f} | {many['p50']:.0f} / {many['p95']:.0f} | "
                        f"{many['tok_s'] / one['tok_s']:.2f} |")
            print(rows[-1], flush=True)
        intervals = [float(v) for v in args.switch_intervals_ms.split(",")]
        alone: dict[float, tuple[float, StepStats]] = {}
        for ms in intervals:  # the engine alone shares the GIL with this process's event loop too
            sys.setswitchinterval(ms / 1000)
            steps = StepStats()
            runtime.engine.observers.add(steps.observer)
            alone[ms] = (asyncio.run(engine_streams(runtime, args.streams, args.duration, args.new)), steps)
            runtime.engine.observers.observers.remove(steps.observer)
    finally:
        runtime.close()
    del runtime, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    daemon = DaemonThread(ServerConfig(base=base_dir, adapters=root, quantization=args.quantization, port=0,
                                       max_batch_size=128, lora_slots=args.slots, max_lora_rank=args.rank,
                                       max_new_tokens=max(1024, args.new), max_queue=100_000,
                                       gil_switch_interval_ms=intervals[0],
                                       http_port=0 if args.http else None)).start()
    e2e_lines = []
    try:
        for ms in intervals:
            sys.setswitchinterval(ms / 1000)  # what the daemon sets from --gil-switch-interval-ms
            steps = StepStats()
            daemon.daemon.state.runtime.engine.observers.add(steps.observer)
            cpu_before = thread_cpu_seconds()
            e2e, tokens = grpc_streams(f"127.0.0.1:{daemon.port}", args.streams, args.client_procs, args.duration,
                                       args.new)
            cpu = cpu_per_token(cpu_before, thread_cpu_seconds(), tokens) if cpu_before else "no /proc"
            daemon.daemon.state.runtime.engine.observers.observers.remove(steps.observer)
            tok_s, alone_steps = alone[ms]
            e2e_lines.append(f"GIL switch interval {ms:g} ms: engine alone {tok_s:.1f} tok/s ({alone_steps}), "
                             f"over gRPC {e2e:.1f} tok/s ({steps}; {cpu}), ratio {e2e / tok_s:.2f}")
            print(e2e_lines[-1], flush=True)
            if args.http:
                e2e_lines.append(http_line(daemon, base_dir.name, args, tok_s))
                print(e2e_lines[-1], flush=True)
    finally:
        daemon.stop()
    if not args.no_record:
        record(args, rows, e2e_lines, device)
    return 0


def http_line(daemon, model: str, args, engine_tok_s: float) -> str:
    """The same streams over HTTP, at the switch interval in force: tok/s, the server's CPU per token, and the
    ratio to the engine alone."""
    steps = StepStats()
    daemon.daemon.state.runtime.engine.observers.add(steps.observer)
    cpu_before = thread_cpu_seconds()
    e2e, tokens = http_streams(f"http://127.0.0.1:{daemon.daemon.http.port}/v1", model, args.streams,
                               args.client_procs, args.duration, args.new)
    cpu = cpu_per_token(cpu_before, thread_cpu_seconds(), tokens) if cpu_before else "no /proc"
    daemon.daemon.state.runtime.engine.observers.observers.remove(steps.observer)
    return f"  over HTTP (OpenAI completions, SSE) {e2e:.1f} tok/s ({steps}; {cpu}), ratio {e2e / engine_tok_s:.2f}"


def record(args, rows: list[str], e2e_lines: list[str], device: torch.device) -> None:
    commit = git_commit()
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n### load_bench: {args.shape} on {machine}, commit {commit}, {when}",
             f"{args.adapters} adapter ids ({args.distinct} distinct r{args.rank} q/k/v/o files), {args.slots} "
             f"device slots, Zipf(1) popularity, Poisson arrivals, {args.duration:g} s per point, {PROMPT_TOKENS} "
             f"prompt + {args.new} new tokens per request, {args.quantization} base.", "",
             "| rate | one adapter: requests | tok/s | p50 / p95 ms | Zipf: requests | tok/s | p50 / p95 ms | "
             "Zipf over one |", "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
             f"End to end: {args.streams} concurrent streams from {args.client_procs} client processes over gRPC "
             f"{'(and over HTTP) ' if args.http else ''}on loopback, against the same concurrency submitted to "
             "the engine in-process:", "",
             *(f"  - {line.strip()}" if line.startswith(" ") else f"- {line}" for line in e2e_lines)]
    with (Path(__file__).resolve().parent / "RESULTS.md").open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
