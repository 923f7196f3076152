"""Soak: many concurrent streaming clients on random adapters, with random cancellations and deadlines, while
adapters are loaded and unloaded in a loop. Counts every outcome, checks every completed greedy answer
against its reference, and reads the daemon's resident memory after a warm-up and at the end.

    python bench/soak.py                      # tiny model on the CPU, 120 s, 32 clients; appends to RESULTS.md
    python bench/soak.py --duration 600 --concurrency 64 --no-record

The daemon is ``adapterd serve`` in a subprocess (its own memory, as in production); the references are the
daemon's own answers to each (prompt, adapter, length) asked alone before the load starts. The load itself
(``run_soak``) is also what tests/server/test_soak.py runs for 25 seconds against an in-process daemon.

Expected outcomes: OK with the reference answer; CANCELLED for a stream the client cancelled; DEADLINE_EXCEEDED
for a call given a short deadline; NOT_FOUND / INVALID_ARGUMENT for the few deliberately bad requests;
FAILED_PRECONDITION for requests naming a poisoned adapter (``make_poisoned_adapters``: NaN or infinite weights,
a NaN alpha, a prefix table holding NaN, weights that overflow in the forward) and INVALID_ARGUMENT for hostile
sampling parameters (a temperature or repetition penalty of 1e-45), all mixed into the same batches as the
checked requests. Anything else, or a completed answer that differs from its reference, is an error: a poisoned
row must end alone and leave every other row's tokens as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from adapterd.clients.client import generate_request
from adapterd.server.core.process import CORE_PROCESS_NAME, frontend_process_name
from adapterd.v1 import adapterd_pb2 as pb
from adapterd.v1 import adapterd_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ("hello world", "你是谁？", "Tell me a story about a robot.", "The capital of France is")
LENGTHS = (8, 32)  # max_new_tokens of the checked requests
Key = tuple[str, str, int]  # (prompt, adapter id, max_new_tokens)


@dataclass
class SoakConfig:
    adapters: Sequence[str]  # ids served under the root; "" (the base) is added
    duration_s: float = 25.0
    max_requests: int = 400
    concurrency: int = 32
    warmup_s: float = 3.0  # memory is read after this much load,
    warmup_requests: int = 1_000_000  # or after this many requests, whichever comes first
    seed: int = 0
    cancel_share: float = 0.15  # streams the client cancels after a few messages
    deadline_share: float = 0.15  # calls with a deadline of 20 to 400 ms
    bad_share: float = 0.05  # requests that must be refused (unknown adapter, too many tokens)
    hostile: Sequence[str] = ()  # poisoned adapter ids (make_poisoned_adapters): each must be refused alone
    hostile_share: float = 0.0  # requests naming a poisoned adapter or hostile sampling parameters
    unary_share: float = 0.2  # Generate instead of GenerateStream
    churn_pause_s: tuple[float, float] = (0.05, 0.3)  # between two LoadAdapter / UnloadAdapter calls
    token: str | None = None  # an admin token when the daemon asks for one


@dataclass
class SoakReport:
    requests: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ok", "cancelled", "deadline", "refused", "hostile"
    by_kind: Counter = field(default_factory=Counter)  # requests per adapter kind: LORA, PREFIX_TUNING, BASE
    loads: int = 0
    unloads: int = 0
    errors: list[str] = field(default_factory=list)  # unexpected statuses and wrong answers
    seconds: float = 0.0
    rss_start: dict[str, int] = field(default_factory=dict)  # bytes by daemon process, after the warm-up
    rss_end: dict[str, int] = field(default_factory=dict)
    peak_in_flight: int = 0


def rss_growth(report: SoakReport) -> dict[str, int]:
    """Bytes each daemon process grew by between the warm-up and the end."""
    return {name: report.rss_end.get(name, 0) - start for name, start in report.rss_start.items()}


# The names the daemon gives its processes (server/core/process.py), as /proc/<pid>/comm shows them.
PROCESS_LABELS = {CORE_PROCESS_NAME: "engine core",
                  **{frontend_process_name(i): f"front end {i + 1}" for i in range(1, 64)}}


def daemon_processes(pid: int) -> dict[str, int]:
    """The daemon's processes by name: the first front end (``pid``), its children (the engine core, other
    front ends), from /proc."""
    found = {"front end 1": pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            name = Path(f"/proc/{child}/comm").read_text().strip()
            if name in PROCESS_LABELS:  # not multiprocessing's resource tracker, nor a merge worker
                label = PROCESS_LABELS[name]
                found[label if label not in found else f"{label} (pid {child})"] = int(child)  # one core per GPU
    return found


def rss_by_process(pids: dict[str, int]) -> dict[str, int]:
    return {name: rss_of(pid) for name, pid in pids.items()}


def rss_of(pid: int | str = "self") -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


async def references(target: str, adapters: Sequence[str], token: str | None = None,
                     prompts: Sequence[str] = PROMPTS, lengths: Sequence[int] = LENGTHS) -> dict[Key, tuple[str, int]]:
    """Each (prompt, adapter, length) asked alone: the text and stop reason every soak answer must match."""
    refs: dict[Key, tuple[str, int]] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AdapterdStub(channel)
        for prompt in prompts:
            for adapter_id in ("", *adapters):
                for n in lengths:
                    r = await stub.Generate(generate_request(prompt, adapter_id, max_new_tokens=n),
                                            metadata=_metadata(token), timeout=120)
                    refs[(prompt, adapter_id, n)] = (r.text, r.stop_reason)
    return refs


class _Load:
    """One soak run's state: the workers and the churner share the report and the stop time."""

    def __init__(self, stub: pb_grpc.AdapterdStub, config: SoakConfig, refs: dict[Key, tuple[str, int]],
                 kinds: dict[str, str]) -> None:
        self.stub, self.config, self.refs, self.kinds = stub, config, refs, kinds
        self.report = SoakReport()
        self.rng = random.Random(config.seed)
        self.meta = _metadata(config.token)
        self.stop_at = 0.0
        self.in_flight = 0
        self.warm = asyncio.Event()  # set when the warm-up is over: memory is read then

    def _error(self, what: str) -> None:
        if len(self.report.errors) < 50:
            self.report.errors.append(what)
        else:
            self.report.outcomes["errors beyond 50"] += 1

    async def worker(self) -> None:
        rng = random.Random(self.rng.random())
        while time.monotonic() < self.stop_at and self.report.requests < self.config.max_requests:
            if self.report.requests >= self.config.warmup_requests:
                self.warm.set()
            self.report.requests += 1
            self.in_flight += 1
            self.report.peak_in_flight = max(self.report.peak_in_flight, self.in_flight)
            try:
                await self.one(rng)
            finally:
                self.in_flight -= 1

    async def one(self, rng: random.Random) -> None:
        c = self.config
        prompt, adapter_id, n = rng.choice(sorted(self.refs))
        self.report.by_kind[self.kinds[adapter_id]] += 1
        roll = rng.random()
        if roll < c.bad_share:
            bad = rng.choice([("no-such-adapter", 4, grpc.StatusCode.NOT_FOUND),
                              (adapter_id, 10**6, grpc.StatusCode.INVALID_ARGUMENT)])
            request = generate_request(prompt, bad[0], max_new_tokens=bad[1])
            try:
                await self.stub.Generate(request, metadata=self.meta, timeout=60)
                self._error(f"bad request {bad[:2]} was accepted")
            except grpc.aio.AioRpcError as exc:
                self._expect(exc.code(), {bad[2]}, "refused", (prompt, adapter_id, n))
            return
        if roll > 1.0 - c.hostile_share:
            await self.hostile(rng, prompt, adapter_id, n)
            return
        request = generate_request(prompt, adapter_id, max_new_tokens=n)
        deadline = rng.uniform(0.02, 0.4) if roll < c.bad_share + c.deadline_share else 120.0
        allowed = {grpc.StatusCode.DEADLINE_EXCEEDED} if deadline < 120 else set()
        cancel_after = rng.randint(0, 3) if rng.random() < c.cancel_share else None
        try:
            if cancel_after is None and rng.random() < c.unary_share:
                r = await self.stub.Generate(request, metadata=self.meta, timeout=deadline)
                self._check((prompt, adapter_id, n), r.text, r.stop_reason)
                return
            call = self.stub.GenerateStream(request, metadata=self.meta, timeout=deadline)
            parts, stop = [], 0
            count = 0
            async for message in call:
                parts.append(message.text)
                stop = message.stop_reason or stop
                count += 1
                if cancel_after is not None and count > cancel_after:
                    call.cancel()
                    break
            if cancel_after is not None and count > cancel_after:
                self.report.outcomes["cancelled"] += 1
                return
            self._check((prompt, adapter_id, n), "".join(parts), stop)
        except grpc.aio.AioRpcError as exc:
            self._expect(exc.code(), allowed, "deadline", (prompt, adapter_id, n), exc.details())

    async def hostile(self, rng: random.Random, prompt: str, adapter_id: str, n: int) -> None:
        """A poisoned adapter (FAILED_PRECONDITION) or a hostile sampling parameter (INVALID_ARGUMENT), sent
        while checked requests share the batch: it must fail alone."""
        if self.config.hostile and rng.random() < 0.6:
            request = generate_request(prompt, rng.choice(list(self.config.hostile)), max_new_tokens=n)
            expected = grpc.StatusCode.FAILED_PRECONDITION
        else:
            hostile = rng.choice([{"temperature": 1e-45}, {"temperature": 0.7, "repetition_penalty": 1e-45}])
            request = generate_request(prompt, adapter_id, max_new_tokens=n, seed=1, **hostile)
            expected = grpc.StatusCode.INVALID_ARGUMENT
        try:
            async for _ in self.stub.GenerateStream(request, metadata=self.meta, timeout=120):
                pass
            self._error(f"hostile request {request.adapter_id!r} {request.sampling} was served")
        except grpc.aio.AioRpcError as exc:
            self._expect(exc.code(), {expected}, "hostile", (prompt, request.adapter_id, n), exc.details())

    def _check(self, key: Key, text: str, stop: int) -> None:
        if (text, stop) == self.refs[key]:
            self.report.outcomes["ok"] += 1
        else:
            self._error(f"{key}: got {(text, stop)!r}, reference {self.refs[key]!r}")

    def _expect(self, code: grpc.StatusCode, allowed: set[grpc.StatusCode], outcome: str, key: Key,
                details: str = "") -> None:
        if code in allowed:
            self.report.outcomes[outcome] += 1
        else:
            self._error(f"{key}: {code.name} {details}")

    async def churn(self, adapters: Sequence[str]) -> None:
        rng = random.Random(self.config.seed + 1)
        while time.monotonic() < self.stop_at and self.report.requests < self.config.max_requests:
            adapter_id = rng.choice(list(adapters))
            try:
                if rng.random() < 0.5:
                    await self.stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=adapter_id), metadata=self.meta,
                                                timeout=60)
                    self.report.loads += 1
                else:
                    await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id),
                                                  metadata=self.meta, timeout=60)
                    self.report.unloads += 1
            except grpc.aio.AioRpcError as exc:
                self._error(f"churn {adapter_id}: {exc.code().name} {exc.details()}")
            await asyncio.sleep(rng.uniform(*self.config.churn_pause_s))


async def run_soak(target: str, config: SoakConfig, refs: dict[Key, tuple[str, int]], kinds: dict[str, str],
                   rss: Callable[[], dict[str, int]]) -> SoakReport:
    """Run the load until ``duration_s`` or ``max_requests``; ``kinds`` maps adapter id -> LORA,
    PREFIX_TUNING or BASE; ``rss`` reads the memory of each of the daemon's processes (after ``warmup_s``, and at
    the end)."""
    async with grpc.aio.insecure_channel(target) as channel:
        load = _Load(pb_grpc.AdapterdStub(channel), config, refs, kinds)
        started = time.monotonic()
        load.stop_at = started + config.duration_s

        async def sample_start() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.warm.wait(), config.warmup_s)
            load.report.rss_start = rss()

        await asyncio.gather(sample_start(), load.churn(config.adapters),
                             *(load.worker() for _ in range(config.concurrency)))
        load.report.seconds = time.monotonic() - started
        load.report.rss_end = rss()
        return load.report


# ---------------------------------------------------------------------------------------- the benchmark


def _make_inputs(work: Path) -> tuple[Path, Path, dict[str, str]]:
    """The tiny model, and PEFT-made LoRA and prefix adapters with random weights (tests/helpers.py)."""
    sys.path.insert(0, str(REPO))
    from adapterd.common.tiny_model import build_tiny_model
    from tests.helpers import make_lora_adapter, make_prefix_adapter

    base = build_tiny_model(work / "base")
    root = work / "adapters"
    make_lora_adapter(base, root / "lora-qv", r=8, alpha=32, targets=["q_proj", "v_proj"], seed=1)
    make_lora_adapter(base, root / "team" / "lora-all", r=4, alpha=8,
                      targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], seed=2)
    make_lora_adapter(base, root / "lora-rs", r=16, alpha=16, targets=["q_proj", "o_proj"], seed=3, use_rslora=True)
    make_prefix_adapter(base, root / "prefix", num_virtual_tokens=6, seed=4)
    make_prefix_adapter(base, root / "prefix-proj", num_virtual_tokens=3, projection=True, seed=5)
    kinds = {"": "BASE", "lora-qv": "LORA", "team/lora-all": "LORA", "lora-rs": "LORA", "prefix": "PREFIX_TUNING",
             "prefix-proj": "PREFIX_TUNING"}
    return base, root, kinds


def _poison_tensors(source: Path, target: Path, change: Callable[[dict], None],
                    config_change: Callable[[dict], None] | None = None) -> None:
    """A copy of the adapter at ``source`` with its tensors (and config) changed, written as PEFT writes it.
    Read through ``peft_format.read_adapter`` (the one reader of adapter directories), which does not check
    values: that is the loader's job, which these copies test."""
    from safetensors.torch import save_file

    from adapterd.server.adapters.peft_format import read_adapter

    target.mkdir(parents=True, exist_ok=True)
    files = read_adapter(source, source)
    tensors = {name: tensor.clone() for name, tensor in files.tensors.items()}
    change(tensors)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = dict(files.raw)
    if config_change is not None:
        config_change(config)
    (target / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")


def make_poisoned_adapters(root: Path, lora_id: str = "lora-qv", prefix_id: str = "prefix") -> list[str]:
    """Poisoned copies of a LoRA and a prefix adapter under ``root/poison/``: a NaN in a lora_B, +inf in a
    lora_A, ``lora_alpha: NaN`` (JSON's NaN, as Python writes it), NaN in the prefix table, and a finite lora_B so
    large that the forward overflows. Returns their ids."""
    from adapterd.server.adapters.peft_format import read_adapter_config

    lora, prefix, out = root / lora_id, root / prefix_id, root / "poison"

    def first(tensors: dict, kind: str) -> str:
        return sorted(k for k in tensors if kind in k)[0]

    def set_value(kind: str, value: float) -> Callable[[dict], None]:
        return lambda t: t[first(t, kind)].view(-1)[0].fill_(value)

    def overflowing(t: dict) -> None:  # every lora_B scaled so that its largest entry times alpha / r is 1e38:
        config = read_adapter_config(lora, lora)  # finite on disk and scaled, but one row of x @ A^T @ B^T
        scaling = config["lora_alpha"] / config["r"]  # overflows float32
        for k in t:
            if "lora_B" in k:
                t[k].mul_(1e38 / (float(t[k].abs().max()) * scaling))

    _poison_tensors(lora, out / "nan-b", set_value("lora_B", float("nan")))
    _poison_tensors(lora, out / "inf-a", set_value("lora_A", float("inf")))
    _poison_tensors(lora, out / "nan-alpha", lambda t: None, lambda c: c.update(lora_alpha=float("nan")))
    _poison_tensors(prefix, out / "nan-prefix", set_value("prompt_embeddings", float("nan")))
    _poison_tensors(lora, out / "overflow", overflowing)
    return [f"poison/{name}" for name in ("nan-b", "inf-a", "nan-alpha", "nan-prefix", "overflow")]


def _describe_machine() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"cpu: {names[0] if names else platform.machine()} ({os.cpu_count()} cores)"



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent client calls")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the first memory reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    from adapterd.clients import AdapterdClient

    with tempfile.TemporaryDirectory(prefix="adapterd-soak-") as tmp:
        base, root, kinds = _make_inputs(Path(tmp))
        hostile = make_poisoned_adapters(root)
        port = free_port()
        cmd = [sys.executable, "-c", "import sys; from adapterd.cli import main; sys.exit(main())", "serve",
               "--base", str(base), "--adapters", str(root), "--quantization", "none", "--host", "127.0.0.1",
               "--port", str(port), "--lora-slots", "3", "--log-level", "WARNING"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        log = Path(tmp) / "daemon.log"
        with log.open("w") as log_file:  # a file, not a pipe: a full pipe would stall the daemon
            daemon = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{port}"
        try:
            with AdapterdClient(target) as client:
                client.wait_ready(120)
            adapters = [a for a in kinds if a]
            refs = asyncio.run(references(target, adapters))
            config = SoakConfig(adapters=adapters, duration_s=args.duration, max_requests=args.max_requests,
                                concurrency=args.concurrency, warmup_s=args.warmup, seed=args.seed,
                                hostile=hostile, hostile_share=0.05)
            processes = daemon_processes(daemon.pid)  # the front end, the engine core (and other front ends)
            report = asyncio.run(run_soak(target, config, refs, kinds, lambda: rss_by_process(processes)))
        finally:
            daemon.terminate()
            daemon.wait(60)
            daemon_log = log.read_text(errors="replace")
    print(format_report(report, config), flush=True)
    if daemon.returncode != 0:
        print(f"daemon exited {daemon.returncode}:\n{daemon_log[-3000:]}", file=sys.stderr)
    if not args.no_record:
        _record(report, config)
    return 0 if not report.errors and daemon.returncode == 0 else 1


def format_report(report: SoakReport, config: SoakConfig) -> str:
    return (f"{report.requests} requests in {report.seconds:.1f} s ({report.requests / report.seconds:.1f}/s), "
            f"{config.concurrency} clients (peak {report.peak_in_flight} in flight); outcomes "
            f"{dict(report.outcomes)}; by kind {dict(report.by_kind)}; {report.loads} loads and {report.unloads} "
            f"unloads meanwhile; {len(report.errors)} unexpected errors; RSS after warm-up -> at the end: "
            f"{_rss_text(report)}"
            + "".join(f"\n  error: {e}" for e in report.errors[:10]))


def _rss_text(report: SoakReport) -> str:
    mib = 1024**2
    growth = rss_growth(report)
    return "; ".join(f"{name} {start / mib:.0f} -> {report.rss_end.get(name, 0) / mib:.0f} MiB "
                     f"({growth[name] / mib:+.1f})" for name, start in report.rss_start.items())


def _record(report: SoakReport, config: SoakConfig) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_table import append_to_section, git_commit

    o = report.outcomes
    row = {"date (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
           "machine": _describe_machine(), "model": "tiny (fp32, CPU)", "duration": f"{report.seconds:.0f} s",
           "requests": str(report.requests), "concurrency": f"{config.concurrency} (peak {report.peak_in_flight})",
           "ok / cancelled / deadline / refused / hostile":
               f"{o['ok']} / {o['cancelled']} / {o['deadline']} / {o['refused']} / {o['hostile']}",
           "loads / unloads": f"{report.loads} / {report.unloads}", "unexpected errors": str(len(report.errors)),
           "RSS start -> end, by process": _rss_text(report)}
    intro = ("Concurrent streaming clients on random adapters (LoRA, prefix, base), random cancellations and "
             "deadlines, adapters loaded and unloaded meanwhile; every completed greedy answer checked against "
             "the daemon's answer alone. RSS of the `adapterd serve` process after the warm-up and at the end.")
    append_to_section(REPO / "bench" / "RESULTS.md", "## Soak (bench/soak.py)", intro, list(row), [row])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
