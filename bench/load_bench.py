"""Serving under load: many adapters with Zipf popularity, and the gRPC path against the engine alone.

1. Many adapters: ``--adapters`` ids registered (``--distinct`` real PEFT LoRA files, the rest symlinks to
   them inside the root, so every id is its own adapter to the daemon: its own load, its own slot), a bounded
   number of device slots, requests arriving as a Poisson process with adapters drawn from a Zipf(1)
   distribution; a rate sweep gives throughput and p50/p95 latency, against the same load on one adapter.
2. End to end: ``--streams`` concurrent streams (each count in the list) from ``--client-procs`` client
   processes over gRPC on loopback, against the same number of concurrent requests submitted to the engine
   in-process (asyncio streams, as ``runtime.generate`` serves them), and against the engine with no client in
   its process at all (each stream's next request submitted by the engine thread: the ceiling); the daemon
   runs as ``adapterd serve`` does (engine core in its own process, ``--frontends`` front ends). Also: time to
   first token of a 512-token prompt, both ways, and CPU per streamed token by process (front ends, engine core).
   With ``--http``, the same streams over the OpenAI-compatible HTTP API too (``/v1/completions`` with
   server-sent events, through the official ``openai`` client).

3. With ``--devices cuda:0,cuda:1``: the same closed-loop streams with Zipf adapters, one engine core on the
   first device against one per listed device (``bench/multi_devices.py``; ``--devices-only``: this alone).

The Zipf sweep goes over gRPC too (a client process drives the load), as users see it.

Runs on the GPU machine (``--shape llama2-7b``) or the CPU (``--shape tiny``: a regression guard, ratios
only). Appends its tables to bench/RESULTS.md with commit, date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import queue
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_table import git_commit
from serve_bench import SHAPES, build_model_dir
from zipf_load import (
    PROMPT_TOKENS,
    WORDS,
    describe_phase,
    histogram_totals,
    in_client_process,
    make_zipf_root,
    poisson_load,
    warm_shapes,
    zipf_choice,
)

from adapterd.server.core.step_stats import StepCounter, StepCounts

TTFT_PROMPT_TOKENS = 512
STREAMS_PER_CONNECTION = 8
# Seconds of the same streams before each measured window, both ways: graph captures of the prefill and decode
# shapes this concurrency meets, and the key/value pool grown to its rows, happen before the window, not in it
# (the engine alone had a warm-up and the daemon's core had none, so only the gRPC figure paid for them).
WARM_UP_S = 3.0
LENGTH_SEED = 10_000  # stream i draws its requests' lengths from Random(LENGTH_SEED + i), both ways


def stream_prompt(rng: random.Random) -> list[int]:
    """One request's prompt, as token ids, the same both ways: ``PROMPT_TOKENS`` of them, so that the engine
    does the same work alone and behind gRPC. (Text drawn from ``WORDS`` tokenizes to ~80 tokens of varying
    length with the bench's tokenizer: at 4e04681 the gRPC side prefilled 25% more tokens, over more graph
    shapes, than the engine alone it was measured against.)"""
    return [rng.randrange(10, 1000) for _ in range(PROMPT_TOKENS)]


def request_length(rng: random.Random, new: int) -> int:
    """Tokens one request generates: uniform over new/2 .. 3*new/2, the same sequence both ways. Equal lengths
    would keep the engine-alone streams in lockstep (all rows finishing, and prefilling again, in the same
    step), which no real load does and which a network's jitter breaks at once."""
    return rng.randint(max(1, new // 2), new + new // 2)


async def engine_streams(runtime, streams: int, duration: float, new: int) -> tuple[float, int, float]:
    """Generated tokens/s with ``streams`` requests always in flight, submitted in-process, over the tokens that
    arrived within the ``duration`` s window (``window_tokens``); every token generated, and the seconds until
    the last request ended (what the step counts and CPU seconds of the phase cover)."""
    from adapterd.server.engine import GenerationParams

    tokens = every = 0
    start = time.perf_counter()
    stop = start + duration

    async def loop(i: int) -> None:
        nonlocal tokens, every
        rng, lengths = random.Random(i), random.Random(LENGTH_SEED + i)
        while time.perf_counter() < stop:
            prompt = stream_prompt(rng)
            length = request_length(lengths, new)
            params = GenerationParams(max_new_tokens=length, min_new_tokens=length)
            counted = 0
            async for event in runtime.generate(prompt, params, None):
                counted, tokens = window_tokens(event.generated_token_count, counted, tokens, stop)
            every += counted

    await asyncio.gather(*(loop(i) for i in range(streams)))
    return tokens / duration, every, time.perf_counter() - start


def engine_streams_direct(runtime, streams: int, duration: float, new: int) -> tuple[float, int, float]:
    """``engine_streams``' closed loop with no client in the process: each stream's next request is submitted by
    the engine thread itself, from the sink that receives its previous request's end, so that nothing but the
    engine runs. The ceiling any front end is measured against: ``engine_streams`` pays for its asyncio clients
    in the engine's own process (their event loop shares the engine thread's GIL)."""
    import threading
    import uuid

    from adapterd.server.engine import GenerationParams

    start = time.perf_counter()
    stop = start + duration
    totals = [0, 0]  # tokens within the window, every token (engine thread only, after the first submits)
    left = [streams]
    done = threading.Event()

    def stream(i: int) -> None:
        rng, lengths = random.Random(i), random.Random(LENGTH_SEED + i)
        counted = 0

        def sink(event) -> None:  # engine thread
            nonlocal counted
            if event.kind not in ("delta", "end"):
                return
            running = counted + len(event.token_ids) if event.kind == "delta" else len(event.token_ids)
            counted, totals[0] = window_tokens(running, counted, totals[0], stop)
            if event.kind == "end":
                totals[1] += counted
                submit()

        def submit() -> None:
            nonlocal counted
            if time.perf_counter() >= stop:
                left[0] -= 1
                if not left[0]:
                    done.set()
                return
            counted = 0
            prompt, length = stream_prompt(rng), request_length(lengths, new)
            runtime.engine.submit(uuid.uuid4().hex, prompt, GenerationParams(max_new_tokens=length,
                                                                             min_new_tokens=length), None, sink)

        submit()

    for i in range(streams):
        stream(i)
    done.wait(duration + 900)
    return totals[0] / duration, totals[1], time.perf_counter() - start


def window_tokens(running: int, counted: int, total: int, stop: float) -> tuple[int, int]:
    """One stream's token count after a message with the request's ``running`` generated-token count:
    ``(counted, total)`` updated with the new tokens if they arrived before ``stop`` (``time.perf_counter``).
    Both ways count only what arrives within the same window, so neither is credited with its ramp-up (client
    processes connecting one after another) or its drain (the last requests finishing with the batch
    emptying), which the window's length alone would not make equal."""
    if running > counted:
        if time.perf_counter() <= stop:
            total += running - counted
        counted = running
    return counted, total


def _client_proc(target: str, ids: tuple[str, ...], streams: int, duration: float, new: int, out: mp.Queue,
                 start: StartSignal) -> None:
    """One client process: ``streams`` concurrent GenerateStream calls in a loop over the common window (see
    ``client_streams``), each request on an adapter drawn Zipf(1) from ``ids`` (none: the base)."""
    from adapterd.clients import AsyncAdapterdClient

    async def main() -> tuple[int, int]:
        tokens = every = 0
        # A connection of its own for every STREAMS_PER_CONNECTION streams, as many clients would open: the
        # kernel spreads connections (not streams) over the daemon's front ends.
        clients = [AsyncAdapterdClient(target, timeout=600, options=[("grpc.use_local_subchannel_pool", 1)])
                   for _ in range(max(1, streams // STREAMS_PER_CONNECTION))]
        for client in clients:
            await client.model_info()  # connected, and the daemon answers
        stop = await start.wait(duration)

        async def loop(i: int) -> None:
            nonlocal tokens, every
            rng, lengths = random.Random(i), random.Random(LENGTH_SEED + i)
            client = clients[i % len(clients)]
            while time.perf_counter() < stop:
                prompt = stream_prompt(rng)
                length = request_length(lengths, new)
                adapter_id = zipf_choice(rng, ids) if ids else ""
                counted = 0
                async for message in client.generate_stream("", adapter_id, prompt_token_ids=prompt,
                                                            max_new_tokens=length,
                                                            min_new_tokens=length):
                    counted, tokens = window_tokens(message.generated_token_count, counted, tokens, stop)
                every += counted
        await asyncio.gather(*(loop(i) for i in range(streams)))
        for client in clients:
            await client.close()
        return tokens, every

    out.put(asyncio.run(main()))


class StartSignal:
    """One start for every client process: each connects, says so, and waits; once all have, the parent sets
    a start time (wall clock) a moment ahead and every process starts its streams then. Without it the
    processes (started one after another, each importing grpc) ran staggered windows, and the gRPC figure
    counted stretches with only some of the streams running against an engine alone that had all of them."""

    def __init__(self, ctx) -> None:
        self.ready, self.go, self.at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)

    def release(self, delay: float = 0.5) -> None:
        self.at.value = time.time() + delay
        self.go.set()

    async def wait(self, duration: float) -> float:
        """Say ready, wait for the start, sleep until it; returns the window's end (``time.perf_counter``)."""
        self.ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, self.go.wait)
        await asyncio.sleep(max(0.0, self.at.value - time.time()))
        return time.perf_counter() + duration


def _http_client_proc(base_url: str, model: str, streams: int, duration: float, new: int, out: mp.Queue,
                      start: StartSignal) -> None:
    """One client process: ``streams`` concurrent streamed completions over HTTP in a loop for ``duration`` s."""
    import openai

    async def main() -> tuple[int, int]:
        tokens = every = 0
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        await client.models.list()  # connected, and the daemon answers
        stop = await start.wait(duration)

        async def loop(i: int) -> None:
            nonlocal tokens, every
            rng, lengths = random.Random(i), random.Random(LENGTH_SEED + i)
            while time.perf_counter() < stop:
                prompt = stream_prompt(rng)
                length = request_length(lengths, new)
                stream = await client.completions.create(model=model, prompt=prompt, max_tokens=length,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True},
                                                         extra_body={"min_tokens": length})
                counted = 0
                async for chunk in stream:  # a chunk a token, text held back aside; the usage last, exact
                    running = chunk.usage.completion_tokens if chunk.usage is not None else counted + 1
                    if chunk.usage is not None or chunk.choices:
                        counted, tokens = window_tokens(running, counted, tokens, stop)
                every += counted
        await asyncio.gather(*(loop(i) for i in range(streams)))
        await client.close()
        return tokens, every

    out.put(asyncio.run(main()))


def grpc_streams(target: str, streams: int, procs: int, duration: float, new: int,
                 ids: list[str] | tuple[str, ...] = ()) -> tuple[float, int, float]:
    return client_streams(_client_proc, (target, tuple(ids)), streams, procs, duration, new)


def http_streams(base_url: str, model: str, streams: int, procs: int, duration: float,
                 new: int) -> tuple[float, int, float]:
    return client_streams(_http_client_proc, (base_url, model), streams, procs, duration, new)


def client_streams(proc, target: tuple, streams: int, procs: int, duration: float,
                   new: int) -> tuple[float, int, float]:
    """Generated tokens/s when ``procs`` client processes (each running ``proc``) serve the same ``duration`` s
    window (``StartSignal``), over the tokens that arrived within it; every token generated, and the seconds
    from the start until the last request ended (as ``engine_streams``)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start = StartSignal(ctx)
    workers = [ctx.Process(target=proc, args=(*target, streams // procs, duration, new, out, start))
               for _ in range(procs)]
    for w in workers:
        w.start()

    def collect(q: mp.Queue, count: int) -> list:
        """``count`` items from ``q``; a client process that dies (its traceback above) ends the bench."""
        items, deadline = [], time.monotonic() + duration + 600
        while len(items) < count:
            try:
                items.append(q.get(timeout=1.0))
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"client processes failed: exit codes {[w.exitcode for w in workers]}") from None
        return items

    collect(start.ready, len(workers))  # every process connected
    start.release()
    began = time.perf_counter()
    counts = collect(out, len(workers))
    wall = time.perf_counter() - began
    for w in workers:
        w.join()
    return sum(c[0] for c in counts) / duration, sum(c[1] for c in counts), wall


def core_steps(daemon) -> StepCounts:
    """The engine core's step counts so far (its ``steps`` call, ``server/core/step_stats.py``)."""
    import msgspec

    return msgspec.convert(daemon.run(daemon.daemon.state.runtime.call("steps")), StepCounts)


def prefill_ms(counts: StepCounts) -> float:
    """Mean milliseconds of one prefill in the engine (forward and sampling): the part of a time to first token
    that is not the path to and from the engine."""
    return counts.prefill_seconds / max(1, counts.prefills) * 1000


def process_cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process. Linux only (/proc); {} elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def daemon_processes(daemon) -> dict[str, int]:
    """The daemon's processes: its first front end (this process: the client processes are others), the other
    front ends, the engine core."""
    pids = {"front end 1": os.getpid()}
    if daemon.daemon.frontends is not None:
        pids.update({f"front end {m.index + 1}": m.process.pid for m in daemon.daemon.frontends.members})
    pids["engine core"] = daemon.daemon.engine_process.process.pid
    return pids


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000 if seconds else float("nan")


def ttft_path(alone: float, alone_prefill: float, grpc: float, core_prefill: float) -> str:
    """Where a TTFT gap lies (ms, p50s of the same token-id prompts): in the prefill itself (the engine thread
    from admission to the first token, slower in the core than alone?) or on the way to and from it (the
    rest: for the engine alone its inbox and the asyncio queue; over gRPC also the front end, both sockets
    and gRPC both ways)."""
    return (f"prefill p50 alone {alone_prefill:.1f} ms, in the core {core_prefill:.1f} ms "
            f"({core_prefill - alone_prefill:+.1f}); outside the prefill alone {alone - alone_prefill:.1f} ms, "
            f"over gRPC as token ids {grpc - core_prefill:.1f} ms ({grpc - core_prefill - alone + alone_prefill:+.2f})")


def cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> str:
    """Microseconds of CPU per streamed token, by process."""
    return "server CPU per token: " + ", ".join(
        f"{name} {(after[name] - before.get(name, 0.0)) / tokens * 1e6:.0f} us" for name in after)


def ttft_prompts(requests: int) -> list[list[int]]:
    """The token ids both sides' TTFT requests send (the same ones, in the same order)."""
    rng = random.Random(7)
    return [[rng.randrange(10, 1000) for _ in range(TTFT_PROMPT_TOKENS)] for _ in range(requests)]


async def engine_ttft(runtime, requests: int) -> float:
    """Median time to the first generated token of a ``TTFT_PROMPT_TOKENS`` prompt, in-process, ms."""
    from adapterd.server.engine import GenerationParams

    times = []
    for prompt in ttft_prompts(requests):
        start = time.perf_counter()
        async for event in runtime.generate(prompt, GenerationParams(max_new_tokens=1), None):
            if event.token_ids:
                times.append(time.perf_counter() - start)
                break
    return statistics.median(times) * 1000


def _ttft_proc(target: str, requests: int, token_ids: bool, out: mp.Queue) -> None:
    """A client process: each TTFT request in turn, the seconds to its first token."""
    from adapterd.clients import AdapterdClient

    rng = random.Random(7)
    times = []
    with AdapterdClient(target, timeout=120) as client:
        for ids in ttft_prompts(requests):
            prompt = " ".join(rng.choice(WORDS) for _ in range(2 * TTFT_PROMPT_TOKENS))
            sent = dict(prompt_token_ids=ids) if token_ids else dict(prompt=prompt)
            start = time.perf_counter()
            for message in client.generate_stream(**sent, max_new_tokens=1,
                                                  truncate_input_tokens=TTFT_PROMPT_TOKENS):
                if message.generated_token_count:
                    times.append(time.perf_counter() - start)
                    break
    out.put(times)


def grpc_ttft(target: str, requests: int, token_ids: bool) -> float:
    """The same over gRPC, ms: as text, cut to its last ``TTFT_PROMPT_TOKENS`` tokens by the daemon (which
    tokenizes it), or as the engine alone's token ids (``prompt_token_ids``: no tokenizing on either side).
    The client runs in a process of its own, as a user's does: in this one it would share the GIL with the
    daemon's first front end (``DaemonThread`` runs it here), a cost no user's client adds, paid or not
    depending on which front end the connection lands on. (On the 2-core CPU machine the extra process competes
    with the prefill for a core instead: read TTFT from the GPU machine's 16 cores only.)"""
    return statistics.median(in_client_process(_ttft_proc, (target, requests, token_ids), 600)) * 1000


def _engine_alone_proc(base_dir: Path, root: Path, args: argparse.Namespace, streams: list[int],
                       out: mp.Queue) -> None:
    """The engine driven in-process: tokens/s at each stream count (with its decode steps), and the TTFT."""
    from transformers.utils import logging as hf_logging

    from adapterd.server.config import ServerConfig
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model
    from adapterd.server.runtime import Runtime

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sys.setswitchinterval(ServerConfig.gil_switch_interval_ms / 1000)  # as the daemon's front end sets it
    base = load_base_model(base_dir, args.quantization)
    rows = max(streams, default=args.slots)  # no streams phase: the Zipf sweep alone
    runtime = Runtime(base, root, EngineConfig(max_batch_size=rows, lora_slots=args.slots,
                                               max_lora_rank=args.rank, max_queue=100_000))
    counter = StepCounter(runtime.engine.runner.graph_captures)
    runtime.engine.observers.add(counter)
    runtime.engine.start()
    alone: dict[int, tuple[float, str]] = {}  # driven by asyncio streams in this process, as runtime.generate is
    direct: dict[int, tuple[float, str]] = {}  # driven from the engine thread: no client in the process
    me = {"engine alone (engine and the bench's event loop)": os.getpid()}
    try:
        asyncio.run(engine_streams(runtime, 4, 2.0, 4))  # warm-up
        for n in streams:
            asyncio.run(engine_streams(runtime, n, args.warm_up, args.new))  # as over gRPC below
            before, cpu_before = counter.counts(), process_cpu_seconds(me)
            tok_s, tokens, span = asyncio.run(engine_streams(runtime, n, args.duration, args.new))
            cpu = cpu_per_token(cpu_before, process_cpu_seconds(me), tokens) if cpu_before else "no /proc"
            alone[n] = (tok_s, f"{counter.counts().minus(before).describe(span)}; {cpu}")
            print(f"engine alone, {n} streams: {tok_s:.1f} tok/s ({alone[n][1]})", flush=True)
            before = counter.counts()
            tok_s, _, span = engine_streams_direct(runtime, n, args.duration, args.new)
            direct[n] = (tok_s, counter.counts().minus(before).describe(span))
            print(f"engine alone with no client in its process, {n} streams: {tok_s:.1f} tok/s ({direct[n][1]})",
                  flush=True)
        before = counter.counts()
        ttft = (asyncio.run(engine_ttft(runtime, args.ttft_requests)), prefill_ms(counter.counts().minus(before)),
                median_ms(counter.prefill_times(args.ttft_requests)))
    finally:
        runtime.close()
    out.put((alone, direct, ttft))


def profile_side(args: argparse.Namespace, streams: list[int], side: str) -> None:
    """With --profile-dir: the engine built next (in a process spawned from here) profiles its decode steps
    into DIR/side, once they have at least half the first stream count's rows."""
    if args.profile_dir and streams:
        os.environ["ADAPTERD_PROFILE_DIR"] = str(Path(args.profile_dir) / side)
        os.environ["ADAPTERD_PROFILE_MIN_ROWS"] = str(max(1, streams[0] // 2))


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
    parser.add_argument("--rates", default="2,4,8", help="request rates (1/s) for the Zipf sweep ('' skips it)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--zipf-duration", type=float, default=None,
                        help="seconds per phase of the Zipf sweep (default: --duration); its p95 is the 5%% tail "
                             "of rate x this many requests, so 10 s at 8/s reads the 4th longest of ~80")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--streams", default="64,256", help="concurrent streams, each count measured both ways")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--frontends", type=int, default=0, help="the daemon's --frontends (0: its default)")
    parser.add_argument("--ttft-requests", type=int, default=50,
                        help="512-token requests a side for the TTFT p50s (their difference is read against 2 ms)")
    parser.add_argument("--warm-up", type=float, default=WARM_UP_S,
                        help="seconds of the same streams before each measured window, both ways")
    parser.add_argument("--http", action="store_true", help="also stream over the OpenAI-compatible HTTP API")
    parser.add_argument("--devices", default=None,
                        help="the daemon's --device; a list (cuda:0,cuda:1) also measures the streams with Zipf "
                             "adapters on one core against one core per device (bench/multi_devices.py)")
    parser.add_argument("--devices-only", action="store_true",
                        help="with a --devices list: only the one-core against one-per-device comparison")
    parser.add_argument("--profile-dir", default=None,
                        help="profile 50 decode steps of the first stream count on each side (torch profiler, "
                             "server/engine/profiling.py): operator tables in DIR/alone and DIR/core")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    args.zipf_duration = args.duration if args.zipf_duration is None else args.zipf_duration

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from adapterd.server.app import DaemonThread
    from adapterd.server.config import ServerConfig
    from adapterd.server.model import pick_device

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    root = work / f"zipf-{args.adapters}"
    ids = make_zipf_root(root, base_dir, args.adapters, args.distinct, args.rank)
    streams = [int(v) for v in args.streams.split(",") if v]
    rows = max(streams, default=args.slots)  # no streams phase: the Zipf sweep alone
    sys.setswitchinterval(ServerConfig.gil_switch_interval_ms / 1000)  # as the daemon's front end sets it
    if args.devices_only:
        from multi_devices import compare_devices, record_devices

        record_devices(args, compare_devices(args, base_dir, root, ids, streams, grpc_streams), git_commit())
        return 0

    ctx = mp.get_context("spawn")  # the engine alone in a process of its own: all its memory goes with it
    out: mp.Queue = ctx.Queue()
    alone_proc = ctx.Process(target=_engine_alone_proc, args=(base_dir, root, args, streams, out))
    profile_side(args, streams, "alone")  # spawned processes take the environment as it is at their start
    alone_proc.start()
    alone, direct, ttft_alone = out.get(timeout=1800)  # ttft_alone: (p50 ms, mean prefill ms, p50 prefill ms)
    alone_proc.join()
    profile_side(args, streams, "core")
    with socket.socket() as probe:  # a free port for the daemon's /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    daemon = DaemonThread(ServerConfig(base=base_dir, adapters=root, quantization=args.quantization, port=0,
                                       max_batch_size=rows, lora_slots=args.slots, max_lora_rank=args.rank,
                                       max_new_tokens=max(1024, args.new), max_queue=100_000,
                                       frontends=args.frontends, metrics_port=metrics_port,
                                       device=args.devices.split(",")[0] if args.devices else None,
                                       http_port=0 if args.http else None)).start()
    target = f"127.0.0.1:{daemon.port}"
    zipf_rows, e2e_lines = [], []
    try:
        for n in streams:
            grpc_streams(target, n, args.client_procs, args.warm_up, args.new)  # as the engine alone above
            processes = daemon_processes(daemon)
            cpu_before, steps_before = process_cpu_seconds(processes), core_steps(daemon)
            e2e, tokens, span = grpc_streams(target, n, args.client_procs, args.duration, args.new)
            cpu = cpu_per_token(cpu_before, process_cpu_seconds(processes), tokens) if cpu_before else "no /proc"
            steps = core_steps(daemon).minus(steps_before).describe(span)
            tok_s, alone_steps = alone[n]
            ceiling, ceiling_steps = direct[n]
            e2e_lines.append(f"{n} streams: engine alone {tok_s:.1f} tok/s ({alone_steps}); over gRPC {e2e:.1f} "
                             f"tok/s ({steps}; {cpu}); ratio {e2e / tok_s:.2f}; against the engine with no client "
                             f"in its process, {ceiling:.1f} tok/s ({ceiling_steps}): {e2e / ceiling:.2f}")
            print(e2e_lines[-1], flush=True)
            if args.http:
                e2e_lines.append(http_line(daemon, base_dir.name, args, n, tok_s))
                print(e2e_lines[-1], flush=True)
        before = core_steps(daemon)
        ttft = (grpc_ttft(target, args.ttft_requests, False), prefill_ms(core_steps(daemon).minus(before)))
        ttft_ids = grpc_ttft(target, args.ttft_requests, True)
        prefill_ids = median_ms(daemon.run(daemon.daemon.state.runtime.call("prefill_times", str(args.ttft_requests))))
        e2e_lines.append(f"time to first token, {TTFT_PROMPT_TOKENS}-token prompt, p50 of {args.ttft_requests}: engine "
                         f"alone {ttft_alone[0]:.1f} ms, over gRPC {ttft[0]:.1f} ms as text "
                         f"({ttft[0] - ttft_alone[0]:+.1f} ms), {ttft_ids:.1f} ms as token ids "
                         f"({ttft_ids - ttft_alone[0]:+.2f} ms); "
                         f"mean prefill in the engine: alone {ttft_alone[1]:.1f} ms, in the core {ttft[1]:.1f} ms; "
                         f"{ttft_path(ttft_alone[0], ttft_alone[2], ttft_ids, prefill_ids)}")
        print(e2e_lines[-1], flush=True)
        # The Zipf sweep last: its adapters wrap the model's layers for LoRA, which the engine alone (above) never
        # has; streams and TTFT are compared with the engine in the same state both ways.
        poisson_load(target, ids, False, 2.0, 3.0, 4, 0)  # warm-up
        warm_shapes(target, ids[0], args.new)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        for rate in (float(r) for r in args.rates.split(",") if r):
            readings = [(histogram_totals(metrics_url), core_steps(daemon))]
            one = poisson_load(target, ids, False, rate, args.zipf_duration, args.new, 1)
            readings.append((histogram_totals(metrics_url), core_steps(daemon)))
            many = poisson_load(target, ids, True, rate, args.zipf_duration, args.new, 1)  # the same arrivals
            readings.append((histogram_totals(metrics_url), core_steps(daemon)))
            for label, (a, b) in zip(("one adapter", "Zipf"), itertools.pairwise(readings), strict=True):
                steps = b[1].minus(a[1]).describe(args.zipf_duration)
                e2e_lines.append(f"Zipf sweep at {rate:g}/s, {label}: {describe_phase(a[0], b[0])}; {steps}")
                print(e2e_lines[-1], flush=True)
            zipf_rows.append(f"| {rate:g}/s | {one['requests']} | {one['tok_s']:.1f} | {one['p50']:.0f} / "
                             f"{one['p95']:.0f} | {many['requests']} | {many['tok_s']:.1f} | {many['p50']:.0f} / "
                             f"{many['p95']:.0f} | {many['tok_s'] / one['tok_s']:.2f} | "
                             f"{many['p95'] / one['p95']:.2f} |")
            print(zipf_rows[-1], flush=True)
        frontends = 1 + len(daemon.daemon.frontends.members) if daemon.daemon.frontends else 1
    finally:
        daemon.stop()
    if args.devices and "," in args.devices:
        from multi_devices import compare_devices

        e2e_lines += compare_devices(args, base_dir, root, ids, streams, grpc_streams)
    if not args.no_record:
        record(args, zipf_rows, e2e_lines, device, frontends)
    return 0


def http_line(daemon, model: str, args, streams: int, engine_tok_s: float) -> str:
    """The same streams over HTTP: tok/s, the engine core's decode steps, CPU per token by process, and the
    ratio to the engine alone."""
    processes = daemon_processes(daemon)
    cpu_before, steps_before = process_cpu_seconds(processes), core_steps(daemon)
    e2e, tokens, span = http_streams(f"http://127.0.0.1:{daemon.daemon.http.port}/v1", model, streams,
                                     args.client_procs, args.duration, args.new)
    steps = core_steps(daemon).minus(steps_before).describe(span)
    cpu = cpu_per_token(cpu_before, process_cpu_seconds(processes), tokens) if cpu_before else "no /proc"
    return f"  over HTTP (OpenAI completions, SSE) {e2e:.1f} tok/s ({steps}; {cpu}), ratio {e2e / engine_tok_s:.2f}"


def record(args, rows: list[str], e2e_lines: list[str], device: torch.device, frontends: int,
           results: Path | None = None) -> None:
    """One block into ``results`` (bench/RESULTS.md): the Zipf table (or a line saying the run had none), then
    the end-to-end lines."""
    commit = git_commit()
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n### load_bench: {args.shape} on {machine}, commit {commit}, {when}",
             f"{args.adapters} adapter ids ({args.distinct} distinct r{args.rank} q/k/v/o files), {args.slots} "
             f"device slots, Zipf(1) popularity, Poisson arrivals, {args.zipf_duration:g} s per point, {PROMPT_TOKENS} "
             f"prompt + {args.new} new tokens per request, {args.quantization} base.", "",
             *(["Both over gRPC (a client process drives the load).", "",
                "| rate | one adapter: requests | tok/s | p50 / p95 ms | Zipf: requests | tok/s | p50 / p95 ms | "
                "Zipf over one: tok/s | p95 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows]
               if rows else ["No Zipf sweep in this run (--rates '')."]), "",
             f"End to end: concurrent streams from {args.client_procs} client processes over gRPC "
             f"{'(and over HTTP) ' if args.http else ''}on loopback (engine core in its own process, {frontends} "
             "front end(s)), against the same concurrency submitted to the engine in-process:", "",
             *(f"  - {line.strip()}" if line.startswith(" ") else f"- {line}" for line in e2e_lines)]
    with (results or Path(__file__).resolve().parent / "RESULTS.md").open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
