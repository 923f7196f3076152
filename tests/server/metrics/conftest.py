"""One daemon with metrics on, shared by this package's tests, and the traffic they check against.

The traffic runs once, before any test reads the metrics, and nothing else sends requests to this daemon,
so every count is known exactly.
"""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

ADAPTERS = ["lora-qv", "team/lora-all", "prefix"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)


@dataclass
class Traffic:
    """What the fixture did, to compare the metrics with."""

    ok: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, adapter label) -> OK RPCs
    prompt_tokens: int = 0
    generated_tokens: int = 0
    engine_requests: int = 0
    multi_token_requests: int = 0


@dataclass
class MetricsDaemon:
    thread: object
    port: int
    metrics_port: int
    traffic: Traffic
    runs_root: Path

    def scrape(self) -> str:
        return scrape(self.metrics_port)


def _write_runs(root: Path) -> None:
    (root / "run-a").mkdir(parents=True)
    (root / "run-a" / "status.json").write_text(json.dumps(
        {"run_id": "run-a", "state": "running", "step": 40, "total_steps": 100, "loss": 1.25,
         "eta_seconds": 90.5, "tokens_per_second": 1234.5}))
    (root / "run-b").mkdir()
    (root / "run-b" / "status.json").write_text(json.dumps(
        {"run_id": "run-b", "state": "pending", "step": 0, "total_steps": 10, "loss": None,
         "eta_seconds": None, "tokens_per_second": 0.0}))
    (root / "not-a-run").mkdir()


@pytest.fixture(scope="package")
def metrics_daemon(tmp_path_factory, tiny_model_dir, adapter_root) -> MetricsDaemon:
    from adapterd.clients import AdapterdClient
    from adapterd.server.app import DaemonThread
    from adapterd.server.config import ServerConfig

    root = tmp_path_factory.mktemp("metrics-adapters")
    for adapter_id in ADAPTERS:
        shutil.copytree(adapter_root / adapter_id, root / adapter_id)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    runs = tmp_path_factory.mktemp("runs")
    _write_runs(runs)
    metrics_port = free_port()
    thread = DaemonThread(ServerConfig(base=tiny_model_dir, adapters=root, quantization="none", port=0,
                                       metrics_port=metrics_port, runs=runs)).start()
    traffic = Traffic()
    try:
        with AdapterdClient(f"127.0.0.1:{thread.port}") as client:
            jobs = [("hello world", ""), ("The quick brown fox", "lora-qv"), ("Tell me a story", "lora-qv"),
                    ("你是谁？", "team/lora-all"), ("hello adapters", "prefix")]
            for prompt, adapter_id in jobs:
                r = client.generate(prompt, adapter_id, max_new_tokens=6)
                _count(traffic, "Generate", adapter_id, r.input_token_count, r.generated_token_count)
            parts = list(client.generate_stream("Paris is the capital", "lora-qv", max_new_tokens=5))
            _count(traffic, "GenerateStream", "lora-qv", parts[0].input_token_count,
                   parts[-1].generated_token_count)
            for bad_id, code in (("does-not-exist", grpc.StatusCode.NOT_FOUND),
                                 ("../escape", grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as err:
                    client.generate("hello", bad_id, max_new_tokens=2)
                assert err.value.code() == code
            with pytest.raises(grpc.RpcError) as err:
                client.load_adapter("broken")
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
    except BaseException:
        thread.stop()
        raise
    yield MetricsDaemon(thread=thread, port=thread.port, metrics_port=metrics_port, traffic=traffic, runs_root=runs)
    thread.stop()


def _count(traffic: Traffic, method: str, adapter_id: str, prompt: int, generated: int) -> None:
    label = adapter_id or "__base__"
    traffic.ok[(method, label)] = traffic.ok.get((method, label), 0) + 1
    traffic.prompt_tokens += prompt
    traffic.generated_tokens += generated
    traffic.engine_requests += 1
