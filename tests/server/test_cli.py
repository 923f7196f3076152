"""Every ``adapterd serve`` flag through the real command line, as an operator types it.

Two daemon processes on the tiny model take every flag with a valid non-default value (A: all the flags that
do not interact; B: a one-row batch with a one-request queue), and each flag's test checks what it did:
``ModelInfo``, an RPC refused at the limit it sets, the metrics port, TLS handshakes, the log. The test list
is parametrized over ``ServerConfig``'s fields, so a new field without a check here fails.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from adapterd.clients import AdapterdClient
from adapterd.server.config import ServerConfig, flag_of
from adapterd.v1 import adapterd_pb2 as pb
from tests.helpers import CLI, ENV, TEST_DEVICE
from tests.server.test_security import ADMIN_TOKEN, _free_port, _make_pki

PROMPT_LIMIT = 12  # --max-input-tokens of daemon A
NEW_TOKENS_LIMIT = 400  # --max-new-tokens of daemon A: a stream of this many holds its RPC slot for a while
# the non-default dtype on the test device, so that ModelInfo shows the flag took
DTYPE = "float32" if TEST_DEVICE.startswith("cuda") else "bfloat16"


@dataclass
class Served:
    """A daemon process started from ``argv``; restarted by ``ready()`` if a test stopped it."""

    argv: list[str]
    log: Path
    host: str = "127.0.0.1"
    client_kw: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    listening: str = ""
    port: int = 0  # as given on the command line (0: as printed)
    metrics_port: int = 0
    http_port: int = 0
    pki: dict[str, Path] = field(default_factory=dict)
    tmp: Path = Path()

    def ready(self) -> Served:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.argv, env=ENV, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                         text=True)
            self.listening = self.proc.stdout.readline()
            assert "listening on" in self.listening, self.log.read_text()[-3000:]
            with self.client() as c:
                c.wait_ready(120)
        return self

    @property
    def target(self) -> str:
        port = re.search(r":(\d+)$", self.listening.strip())[1]
        return f"{self.host}:{port}"

    def client(self, **kw) -> AdapterdClient:
        return AdapterdClient(self.target, **{"timeout": 60, **self.client_kw, **kw})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon_a(tiny_model_dir, adapter_root, pki, tmp_path_factory):
    """Every flag that does not interact with another, each with a non-default value."""
    tmp = tmp_path_factory.mktemp("serve-a")
    root = tmp / "adapters"
    shutil.copytree(adapter_root, root)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": -1}')
    (tmp / "tokens").write_text(f"admin:{ADMIN_TOKEN}\n")
    for name in ("runs", "merged"):
        (tmp / name).mkdir()
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    argv = [*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(root), "--quantization", "none",
            "--host", "localhost", "--port", str(port), "--device", TEST_DEVICE, "--dtype", DTYPE,
            "--max-batch-size", "3", "--lora-slots", "4", "--max-lora-rank", "8", "--no-cuda-graphs",
            "--no-int8-kernel", "--no-fused-kernels", "--no-own-decoder", "--gil-switch-interval-ms", "0.5",
            "--adapter-cache-mb", "7",
            "--max-input-tokens", str(PROMPT_LIMIT), "--max-new-tokens", str(NEW_TOKENS_LIMIT),
            "--default-max-new-tokens", "3", "--max-message-bytes", "65536", "--runs", str(tmp / "runs"),
            "--merge-output-root", str(tmp / "merged"), "--metrics-port", str(metrics_port),
            "--http-port", str(http_port),
            "--max-concurrent-rpcs", "1", "--max-open-rpcs", "1", "--tokens-file", str(tmp / "tokens"),
            "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
            "--tls-client-ca", str(pki["ca.crt"]), "--frontends", "2"]
    credentials = grpc.ssl_channel_credentials(pki["ca.crt"].read_bytes(), pki["client.key"].read_bytes(),
                                               pki["client.crt"].read_bytes())
    served = Served(argv, tmp / "stderr.log", host="localhost", port=port, metrics_port=metrics_port,
                    http_port=http_port, pki=pki, tmp=tmp, client_kw={"credentials": credentials, "token": ADMIN_TOKEN})
    yield served.ready()
    served.stop()


@pytest.fixture(scope="module")
def daemon_b(tiny_model_dir, adapter_root, tmp_path_factory):
    """One row decoded at a time and one request waiting; debug logging; a short grace."""
    tmp = tmp_path_factory.mktemp("serve-b")
    metrics_port = _free_port()  # check_max_queue reads the waiting requests off /metrics
    argv = [*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root), "--quantization",
            "none", "--port", "0", "--device", TEST_DEVICE, "--max-batch-size", "1", "--max-queue", "1",
            "--log-level", "debug", "--grace", "3", "--http-port", "0", "--no-engine-process",
            "--metrics-port", str(metrics_port)]
    served = Served(argv, tmp / "stderr.log", metrics_port=metrics_port)
    yield served
    served.stop()


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        list(result) if hasattr(result, "__next__") else None
    return err.value.code()


def _settings(d: Served) -> str:
    """The daemon's start-up line listing the settings that differ from the defaults."""
    return next(line for line in d.log.read_text().splitlines() if "settings (others at their defaults)" in line)


def _metrics(d: Served) -> str:
    with urllib.request.urlopen(f"http://localhost:{d.metrics_port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _info(d: Served) -> pb.ModelInfoResponse:
    with d.client() as c:
        return c.model_info()


# ------------------------------------------------------------------------------------------ one check a flag


def check_base(a: Served, b: Served) -> None:
    assert _info(a).model_type == "llama"
    with a.client() as c:
        assert c.generate("hello", "lora-qv", max_new_tokens=2).generated_token_count == 2


def check_adapters(a: Served, b: Served) -> None:
    """The root's adapters, through ``adapterd adapters list`` with the client's TLS flags and token; the
    broken one with the reason it cannot load."""
    tls = ["--tls-ca", str(a.pki["ca.crt"]), "--tls-cert", str(a.pki["client.crt"]),
           "--tls-key", str(a.pki["client.key"])]
    out = subprocess.run([*CLI, "adapters", "list", "--target", a.target, *tls], env={**ENV, "ADAPTERD_TOKEN":
                         ADMIN_TOKEN}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert {"lora-qv", "team/lora-all", "prefix", "broken"} <= set(rows)
    assert "REASON" in out.stdout.splitlines()[0]
    assert "LOAD_FAILED" in rows["broken"] and "r must be a positive integer" in rows["broken"]


def check_quantization(a: Served, b: Served) -> None:
    assert _info(a).quantization == "none"


def check_host(a: Served, b: Served) -> None:
    assert a.listening.strip().endswith(f"listening on localhost:{a.port}")
    assert _info(a).version  # reached through "localhost", the name the server certificate carries


def check_port(a: Served, b: Served) -> None:
    check_host(a, b)
    assert a.port != 50051


def check_device(a: Served, b: Served) -> None:
    assert _info(a).device.split(":")[0] == TEST_DEVICE.split(":")[0]


def check_dtype(a: Served, b: Served) -> None:
    assert _info(a).dtype == DTYPE


def check_max_batch_size(a: Served, b: Served) -> None:
    assert _info(a).max_batch_size == 3


def check_max_queue(a: Served, b: Served) -> None:
    with b.ready().client() as c:
        running = c.generate_stream("hello", max_new_tokens=1000, min_new_tokens=1000)
        next(running)  # the one row of the batch is busy for a while
        waiting = c.generate_stream("hello", max_new_tokens=2)  # takes the one place in the queue
        try:
            deadline = time.monotonic() + 30  # until the daemon counts it (not a fixed sleep: a loaded machine)
            while not re.search(r"^adapterd_requests_waiting 1\.0$", _metrics(b), re.M):
                assert time.monotonic() < deadline, _metrics(b)
                time.sleep(0.05)
            assert _code(lambda: c.generate("hello", max_new_tokens=1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            running.cancel()
            waiting.cancel()


def check_lora_slots(a: Served, b: Served) -> None:
    assert _info(a).adapter_slots == 4


def check_max_lora_rank(a: Served, b: Served) -> None:
    assert _info(a).max_lora_rank == 8
    with a.client() as c:
        assert _code(lambda: c.generate("hi", "lora-rs", max_new_tokens=1)) == grpc.StatusCode.FAILED_PRECONDITION


def _no_gpu_speedups(a: Served) -> None:
    """With the three GPU paths off, none is used (on a CPU none ever is: the settings line shows the flag
    took; on a GPU the metrics show it)."""
    with a.client() as c:
        c.generate("hello", "lora-qv", max_new_tokens=4)
    text = _metrics(a)
    assert not re.search(r"^adapterd_cuda_graphs\{.*\} [1-9]", text, re.M)
    assert not re.search(r"^adapterd_kernel_swapped_modules\{.*\} [1-9]", text, re.M)


def check_cuda_graphs(a: Served, b: Served) -> None:
    assert "--cuda-graphs=False" in _settings(a)
    _no_gpu_speedups(a)


def check_int8_kernel(a: Served, b: Served) -> None:
    assert "--int8-kernel=False" in _settings(a)
    _no_gpu_speedups(a)


def check_fused_kernels(a: Served, b: Served) -> None:
    assert "--fused-kernels=False" in _settings(a)
    _no_gpu_speedups(a)


def check_own_decoder(a: Served, b: Served) -> None:
    assert "--own-decoder=False" in _settings(a)
    assert "decoder forward: transformers'" in a.log.read_text()  # logged by the engine core
    assert "decoder forward: own" in b.ready().log.read_text()  # the default for a Llama base


def _spawned(d: Served) -> list[str]:
    """The command lines of the processes the daemon spawned (engine core, front ends)."""
    out = []
    for task in Path(f"/proc/{d.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
            if "spawn_main" in command:
                out.append(command)
    return out


def check_engine_process(a: Served, b: Served) -> None:
    assert "--engine-process=False" in _settings(b.ready())
    assert _spawned(b) == []  # the engine runs in the gRPC process
    assert len(_spawned(a)) == 2  # the default: the engine core, plus a's second front end


def check_frontends(a: Served, b: Served) -> None:
    assert "--frontends=2" in _settings(a)
    assert "adapterd_frontend_1_process_cpu_seconds_total" in _metrics(a)  # front end 2 reports through 1


def check_gil_switch_interval_ms(a: Served, b: Served) -> None:
    assert "--gil-switch-interval-ms=0.5" in _settings(a)  # a float: this flag crashed argparse once


def check_adapter_cache_mb(a: Served, b: Served) -> None:
    assert "--adapter-cache-mb=7" in _settings(a)


def check_max_input_tokens(a: Served, b: Served) -> None:
    long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    with a.client() as c:
        assert _code(lambda: c.generate(long_prompt, max_new_tokens=1)) == grpc.StatusCode.INVALID_ARGUMENT
        assert c.generate(long_prompt, max_new_tokens=1, truncate_input_tokens=PROMPT_LIMIT).input_token_count \
            == PROMPT_LIMIT


def check_max_new_tokens(a: Served, b: Served) -> None:
    assert _info(a).max_new_tokens == NEW_TOKENS_LIMIT
    with a.client() as c:
        too_many = NEW_TOKENS_LIMIT + 1
        assert _code(lambda: c.generate("hi", max_new_tokens=too_many)) == grpc.StatusCode.INVALID_ARGUMENT


def check_default_max_new_tokens(a: Served, b: Served) -> None:
    with a.client() as c:
        reply = c.generate("hello", min_new_tokens=3)  # max_new_tokens 0: the daemon's default
    assert reply.generated_token_count == 3 and reply.stop_reason == pb.MAX_TOKENS


def check_max_message_bytes(a: Served, b: Served) -> None:
    with a.client() as c:
        assert _code(lambda: c.generate("x" * 70_000, max_new_tokens=1)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def check_runs(a: Served, b: Served) -> None:
    with a.client() as c:
        assert c.train_status() == []  # with no --runs: FAILED_PRECONDITION, training is off


def check_merge_output_root(a: Served, b: Served) -> None:
    request = pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora-qv")],
                                     output_model_dir=str(a.tmp / "elsewhere"))
    with a.client() as c:
        assert _code(lambda: c.merge(request)) == grpc.StatusCode.INVALID_ARGUMENT


def check_metrics_port(a: Served, b: Served) -> None:
    assert 'quantization="none"' in _metrics(a)


def check_http_port(a: Served, b: Served) -> None:
    """HTTPS with the daemon's certificate and client-certificate check, the daemon's tokens; B serves plain
    HTTP on a free port and still drains on SIGTERM (check_grace): uvicorn does not take the signal."""
    context = ssl.create_default_context(cafile=str(a.pki["ca.crt"]))
    context.load_cert_chain(str(a.pki["client.crt"]), str(a.pki["client.key"]))
    url = f"https://localhost:{a.http_port}/v1/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        assert "lora-qv" in {m["id"] for m in json.load(reply)["data"]}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, context=context, timeout=30)
    assert err.value.code == 401 and json.load(err.value)["error"]["type"] == "authentication_error"
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port: refused
        urllib.request.urlopen(f"http://localhost:{a.http_port}/v1/models", timeout=30)


def check_max_concurrent_rpcs(a: Served, b: Served) -> None:
    with a.client() as c:
        holding = c.generate_stream("hi", max_new_tokens=NEW_TOKENS_LIMIT, min_new_tokens=NEW_TOKENS_LIMIT)
        next(holding)
        try:
            assert _code(c.model_info) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            holding.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the slot comes back once the daemon has seen the cancellation
            try:
                c.model_info()
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.05)


def check_max_open_rpcs(a: Served, b: Served) -> None:
    with a.client() as c:
        watch = c.health.Watch(health_pb2.HealthCheckRequest(service=""))
        next(watch)  # one health stream open: the budget of one is used
        try:
            assert _code(lambda: c.health.Check(health_pb2.HealthCheckRequest(), timeout=10)) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            watch.cancel()


def check_tokens_file(a: Served, b: Served) -> None:
    with a.client(token=None) as c:
        assert _code(c.model_info) == grpc.StatusCode.UNAUTHENTICATED


def check_tls_cert(a: Served, b: Served) -> None:
    with a.client(credentials=None) as c:  # plaintext to a TLS port
        assert _code(c.model_info) == grpc.StatusCode.UNAVAILABLE


def check_tls_key(a: Served, b: Served) -> None:
    check_tls_cert(a, b)  # a key that did not match --tls-cert would have stopped start-up
    check_base(a, b)


def check_tls_client_ca(a: Served, b: Served) -> None:
    without_client_cert = grpc.ssl_channel_credentials(a.pki["ca.crt"].read_bytes())
    with a.client(credentials=without_client_cert) as c:
        assert _code(c.model_info) == grpc.StatusCode.UNAVAILABLE


def check_log_level(a: Served, b: Served) -> None:
    assert " DEBUG " in b.ready().log.read_text()
    assert " DEBUG " not in a.log.read_text()  # the default, INFO


def check_grace(a: Served, b: Served) -> None:
    b.ready().proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0
    assert "draining for up to 3 s" in b.log.read_text()


CHECKS = {name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")}
FLAGS = [f.name for f in fields(ServerConfig)] + ["log_level", "grace"]  # the last two belong to the process


@pytest.mark.parametrize("name", FLAGS)
def test_every_serve_flag_takes_effect(name, daemon_a, daemon_b):
    assert name in CHECKS, f"add check_{name} here for the new ServerConfig field {name}"
    CHECKS[name](daemon_a.ready(), daemon_b)


def test_help_shows_every_flag_with_its_default():
    out = subprocess.run([*CLI, "serve", "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in fields(ServerConfig):
        assert flag_of(f.name) in text
    for shown in ("--max-batch-size N rows decoded together (default: 32)", "(default: 0.2)", "(default: on)",
                  "--quantization {int8,nf4,none}", "(default: 30)", "(default: INFO)"):
        assert shown in text
