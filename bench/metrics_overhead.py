"""Throughput cost of the metrics: the same workload against a daemon with ``--metrics-port`` and one without.

Both daemons run at once as separate processes (``adapterd serve``) on the same model; the workload goes to
one at a time, alternating which goes first in each repetition, so slow drifts of the machine hit both
sides alike. Each run sends ``--requests`` greedy Generate RPCs, ``--concurrency`` at a time, cycling over
the base and three LoRA adapters, each forced to produce exactly ``--new-tokens`` tokens
(min = max new tokens), and reports generated tokens per second. While the metrics daemon runs, a scraper
reads its ``/metrics`` every ``--scrape-interval`` seconds (1 s: 15 times Prometheus's default rate).

Reported: medians (bootstrap 95% intervals) of the per-repetition ratios on/off of throughput and of the
daemon's CPU time (user + system, all threads, /proc) per token; and, since on a shared machine that A/B is
noisy, each part measured alone (engine observer per token, interceptor per RPC, CPU per scrape) as a share
of the daemon's CPU time per token. ``--model large`` prints the GPU series scraped while generating.

    python bench/metrics_overhead.py                        # tiny model on the CPU; appends to RESULTS.md
    python bench/metrics_overhead.py --model large --device cuda:0 --json-out r.json --no-append  # GPU host
    python bench/metrics_overhead.py --append-from r.json    # record a remote result here
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Metrics overhead (bench/metrics_overhead.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "model", "workload", "reps", "tokens/s off", "tokens/s on",
           "throughput on/off: median [95% CI]", "daemon CPU/token on/off: median [95% CI]",
           "parts: hooks + RPC + scrapes = cost")
PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "Tell me a story about a robot.",
           "你是谁？", "What is the capital of France?", "Summarize the following text."]
ADAPTERS = ["", "lora-a", "lora-b", "lora-c"]
# What the measured path runs through (a change elsewhere does not make the row's commit "-dirty").
CODE_PATHS = ("server/metrics", "server/engine", "server/adapters", "server/app.py", "server/service.py",
              "server/runtime.py", "server/model.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def resolve_device(requested: str | None) -> str:
    """The device the daemons pick: the requested one, else cuda:0 when there is a GPU, else cpu."""
    import torch

    return requested or ("cuda:0" if torch.cuda.is_available() else "cpu")


def describe_machine(device: str) -> str:
    cores = os.cpu_count() or 0
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} ({cores} cores)"
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"cpu: {names[0] if names else platform.machine()} ({cores} cores)"


# ---------------------------------------------------------------------------------------------- inputs

def build_model(work: Path, size: str) -> tuple[Path, dict]:
    """The tiny model, or a larger random Llama (``large``: about 0.75 B parameters) for a GPU."""
    from adapterd.common.tiny_model import TinyModelConfig, build_tiny_model

    cfg = TinyModelConfig() if size == "tiny" else TinyModelConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=8, max_position_embeddings=2048)
    started = time.monotonic()
    path = build_tiny_model(work / "base", cfg)
    print(f"built the {size} model in {time.monotonic() - started:.1f} s", flush=True)
    return path, json.loads((path / "config.json").read_text())


def write_lora(out: Path, config: dict, r: int, seed: int) -> None:
    """A PEFT-format LoRA on q_proj and v_proj with random A and B (so that it changes the output)."""
    import torch
    from safetensors.torch import save_file

    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outs = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, out_features in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.02
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(outs), "lora_dropout": 0.0,
         "task_type": "CAUSAL_LM", "bias": "none"}))


# ---------------------------------------------------------------------------------------------- daemons

class Daemon:
    """``adapterd serve`` in a subprocess."""

    def __init__(self, base: Path, adapters: Path, args: argparse.Namespace, metrics: bool, log: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        cmd = [sys.executable, "-c", "import sys; from adapterd.cli import main; sys.exit(main())", "serve",
               "--base", str(base), "--adapters", str(adapters), "--quantization", "none",
               "--host", "127.0.0.1", "--port", str(self.port), "--max-batch-size", str(args.concurrency),
               "--log-level", "WARNING"]
        if args.device:
            cmd += ["--device", args.device]
        if self.metrics_port is not None:
            cmd += ["--metrics-port", str(self.metrics_port)]
        self._log = log.open("w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the daemon
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.log = log
        self.last_scrape = b""  # the exposition read during the latest run (GPU gauges while generating)

    def wait_ready(self, timeout: float) -> None:
        from adapterd.clients import AdapterdClient

        with AdapterdClient(f"127.0.0.1:{self.port}") as client:
            try:
                client.wait_ready(timeout)
            except TimeoutError:
                raise SystemExit(f"daemon did not start:\n{self.log.read_text()[-3000:]}") from None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon process so far, all threads (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


async def _workload(port: int, args: argparse.Namespace) -> tuple[int, float]:
    """Send the requests; returns (generated tokens, seconds)."""
    from adapterd.clients.client import AsyncAdapterdClient

    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait((PROMPTS[i % len(PROMPTS)], ADAPTERS[i % len(ADAPTERS)]))
    tokens = 0

    async with AsyncAdapterdClient(f"127.0.0.1:{port}", timeout=600) as client:
        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                prompt, adapter_id = queue.get_nowait()
                r = await client.generate(prompt, adapter_id, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens)
                tokens += r.generated_token_count
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return tokens, time.perf_counter() - started


def measure(daemon: Daemon, args: argparse.Namespace) -> tuple[float, float]:
    """(tokens per second, daemon CPU seconds per token) of one run (a scraper on the metrics daemon)."""
    stop = threading.Event()
    scraper = None
    if daemon.metrics_port is not None:
        def scrape_loop() -> None:
            while not stop.wait(args.scrape_interval):
                daemon.last_scrape = daemon.scrape()
        scraper = threading.Thread(target=scrape_loop, daemon=True)
        scraper.start()
    cpu0 = daemon.cpu_seconds()
    try:
        tokens, seconds = asyncio.run(_workload(daemon.port, args))
        cpu = daemon.cpu_seconds() - cpu0
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(10)
    expected = args.requests * args.new_tokens
    if tokens != expected:
        raise SystemExit(f"generated {tokens} tokens, expected {expected}: the two sides would differ in work")
    return tokens / seconds, cpu / tokens


# ---------------------------------------------------------------------------------------------- the parts alone

def hook_cost_us_per_token(batch: int, new_tokens: int, rounds: int = 200) -> float:
    """Microseconds the engine observer spends per generated token, batches of ``batch`` rows."""
    from types import SimpleNamespace

    from adapterd.server.engine.request import StopReason
    from adapterd.server.metrics.definitions import Metrics
    from adapterd.server.metrics.labels import AdapterLabels
    from adapterd.server.metrics.observer import MetricsObserver

    observer = MetricsObserver(Metrics(), AdapterLabels())
    adapters = [None] + [SimpleNamespace(adapter_id=a) for a in ADAPTERS[1:]]
    started = time.perf_counter()
    for _ in range(rounds):
        rows = [SimpleNamespace(adapter=adapters[i % len(adapters)], submitted=time.monotonic(),
                                generated=list(range(new_tokens)), finished=StopReason.MAX_TOKENS)
                for i in range(batch)]
        for row in rows:
            observer.request_admitted(row, 0.001)
        observer.prefill_done(rows, 10 * batch)
        for _ in range(new_tokens - 1):
            observer.decode_step(rows, 0.01)
        for row in rows:
            observer.request_finished(row)
    return (time.perf_counter() - started) / (rounds * batch * new_tokens) * 1e6


def interceptor_cost_us_per_rpc(calls: int = 20000) -> float:
    """Microseconds the RPC interceptor adds to one unary call (wrapped handler minus the bare one)."""
    from types import SimpleNamespace

    import grpc

    from adapterd.server.metrics.definitions import Metrics
    from adapterd.server.metrics.interceptor import RpcMetricsInterceptor
    from adapterd.server.metrics.labels import AdapterLabels

    async def bare(request, context):
        return request

    async def timed() -> float:
        interceptor = RpcMetricsInterceptor(Metrics(), AdapterLabels())

        async def continuation(details):
            return grpc.unary_unary_rpc_method_handler(bare)
        details = SimpleNamespace(method="/adapterd.v1.Adapterd/Generate", invocation_metadata=())
        wrapped = (await interceptor.intercept_service(continuation, details)).unary_unary
        request, context = SimpleNamespace(adapter_id="lora-a"), SimpleNamespace(code=lambda: None)
        best = {}
        for name, fn in (("bare", bare), ("wrapped", wrapped)) * 3:
            started = time.perf_counter()
            for _ in range(calls):
                await fn(request, context)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - started)
        return max(0.0, best["wrapped"] - best["bare"]) / calls * 1e6
    return asyncio.run(timed())


def scrape_cpu_seconds(daemon: Daemon, scrapes: int = 50) -> float:
    """CPU seconds the metrics daemon spends on one scrape (idle daemon, back-to-back scrapes)."""
    cpu0 = daemon.cpu_seconds()
    for _ in range(scrapes):
        daemon.scrape()
    return (daemon.cpu_seconds() - cpu0) / scrapes


# ---------------------------------------------------------------------------------------------- results

def median_ci(values: list[float], draws: int = 4000) -> tuple[float, float, float]:
    """Median and a bootstrap 95% interval of the median."""
    import random

    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def _summary(values: list[float]) -> str:
    median, low, high = median_ci(values)
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


def parts_estimate(result: dict) -> dict[str, float]:
    """Each part's cost as a fraction of the daemon's CPU time per token (metrics off)."""
    cpu_us = statistics.median(result["cpu_off"]) * 1e6
    daemon_cpu_per_s = statistics.median(result["on"]) * statistics.median(result["cpu_on"])
    parts = {"hooks": result["hook_us_per_token"] / cpu_us,
             "rpc": result["interceptor_us_per_rpc"] / result["new_tokens"] / cpu_us,
             "scrapes": result["scrape_cpu_s"] / result["scrape_interval"] / daemon_cpu_per_s}
    parts["total"] = sum(parts.values())
    return parts


def make_row(result: dict, machine: str, commit: str) -> dict[str, str]:
    parts = parts_estimate(result)
    values = (result["date"], commit, machine, result["model"],
              f"{result['requests']} req x {result['new_tokens']} tok, {result['concurrency']} concurrent, "
              f"scrape every {result['scrape_interval']:g} s"
              + (f", {result['threads']} torch thread(s)" if result.get("threads") else ""),
              str(len(result["ratios"])),
              f"{statistics.median(result['off']):.0f}", f"{statistics.median(result['on']):.0f}",
              _summary(result["ratios"]), _summary(result["cpu_ratios"]),
              f"{parts['hooks']:.2%} + {parts['rpc']:.2%} + {parts['scrapes']:.2%} = {parts['total']:.2%}")
    return dict(zip(COLUMNS, values, strict=True))


def append_row(row: dict[str, str], results: Path) -> None:
    """Add the row under this benchmark's section of RESULTS.md (creating the section at the end)."""
    intro = ("Generated tokens/s of one daemon with `--metrics-port` (scraped) against one without, same model "
            "and workload, alternating, in one session: medians of the per-repetition ratios on/off, with a "
            "bootstrap 95% interval (throughput cost = 1 - ratio; CPU cost = ratio - 1). Parts: each piece "
            "of the metrics measured alone (engine observer per token, interceptor per RPC, CPU per scrape) "
            "as a share of the daemon's CPU time per token: the precise figure where the A/B is noisy.")
    added = append_to_section(results, SECTION, intro, COLUMNS, [row])
    print(f"appended to {results}:", *added, sep="\n")


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    base, config = build_model(work, args.model)
    for i, name in enumerate(a for a in ADAPTERS if a):
        write_lora(work / "adapters" / name, config, r=8, seed=i + 1)
    off = Daemon(base, work / "adapters", args, metrics=False, log=work / "off.log")
    on = Daemon(base, work / "adapters", args, metrics=True, log=work / "on.log")
    result: dict = {"off": [], "on": [], "cpu_off": [], "cpu_on": [], "ratios": [], "cpu_ratios": []}
    try:
        for daemon in (off, on):
            daemon.wait_ready(args.start_timeout)
            measure(daemon, args)  # warm-up: loads the adapters, fills caches
        for rep in range(args.reps):
            order = (off, on) if rep % 2 == 0 else (on, off)
            got = {id(d): measure(d, args) for d in order}
            (tps_off, cpu_off), (tps_on, cpu_on) = got[id(off)], got[id(on)]
            result["off"].append(tps_off)
            result["on"].append(tps_on)
            result["cpu_off"].append(cpu_off)
            result["cpu_on"].append(cpu_on)
            result["ratios"].append(tps_on / tps_off)
            result["cpu_ratios"].append(cpu_on / cpu_off)
            print(f"rep {rep + 1}/{args.reps}: off {tps_off:8.1f} tok/s {cpu_off * 1e6:7.1f} CPU µs/tok   "
                  f"on {tps_on:8.1f} tok/s {cpu_on * 1e6:7.1f} CPU µs/tok   throughput ratio "
                  f"{result['ratios'][-1]:.3f}  CPU ratio {result['cpu_ratios'][-1]:.3f}", flush=True)
        sample = on.last_scrape.decode()
        result["scrape_cpu_s"] = scrape_cpu_seconds(on)
        result["gpu_lines"] = [line for line in sample.splitlines() if line.startswith("adapterd_gpu_")
                               or line.startswith("adapterd_torch_cuda_")]
    finally:
        off.stop()
        on.stop()
    result.update(model=f"{args.model} random Llama ({config['num_hidden_layers']} layers, hidden "
                        f"{config['hidden_size']}), {args.device}",
                  requests=args.requests, new_tokens=args.new_tokens, concurrency=args.concurrency,
                  scrape_interval=args.scrape_interval, threads=args.threads,
                  date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                  hook_us_per_token=hook_cost_us_per_token(args.concurrency, args.new_tokens),
                  interceptor_us_per_rpc=interceptor_cost_us_per_rpc())
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "large"), default="tiny", help="large: ~0.75 B params, for a GPU")
    p.add_argument("--device", default=None, help="torch device for the daemons (default: cuda:0 if present)")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--scrape-interval", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each daemon (default: "
                   "torch's own choice)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--machine", help="machine description for the row (default: detected)")
    p.add_argument("--commit", help="commit for the row (default: git rev-parse of this checkout)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--json-out", type=Path, help="also write the result and row as JSON here")
    p.add_argument("--append-from", type=Path, help="append a row from an earlier --json-out and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.append_from:
        append_row(json.loads(args.append_from.read_text())["row"], args.results)
        return 0
    args.device = resolve_device(args.device)
    result = run(args)
    row = make_row(result, args.machine or describe_machine(args.device), args.commit or git_commit(*CODE_PATHS))
    print(json.dumps(row, indent=1, ensure_ascii=False))
    print("\n".join(["GPU series scraped while generating:"] + result["gpu_lines"]) if result["gpu_lines"]
          else "no GPU series (none expected without a GPU)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"result": result, "row": row}, indent=1, ensure_ascii=False))
    if not args.no_append:
        append_row(row, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
