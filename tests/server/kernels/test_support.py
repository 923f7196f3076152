"""The kernels' availability check runs a real compile: a tiny Triton kernel once per process and device.
Where it fails (no C compiler, no Python headers, anything), every kernel stays off, the engine keeps the
PyTorch paths, and one warning says why and how to fix it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from adapterd.server.engine.swaps import use_fused_norms, use_int8_kernel  # noqa: E402
from adapterd.server.kernels import (  # noqa: E402
    fused_rms_norm_available,
    int8_kernel_available,
    lora_kernel_available,
    probe,
    support,
    triton_available,
)
from adapterd.server.model import load_base_model  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
NO_COMPILER = "Failed to find C compiler. Please specify via CC environment variable."


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as the check can tell, the interpreter off, and the
    check's per-process cache empty before and after (so that nothing leaks into other tests)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    support._compile_problem.cache_clear()
    yield
    support._compile_problem.cache_clear()


def _probe_calls(monkeypatch, error: Exception | None) -> list[torch.device]:
    calls: list[torch.device] = []

    def run(device: torch.device) -> None:
        calls.append(device)
        if error is not None:
            raise error

    monkeypatch.setattr(probe, "run", run)
    return calls


def test_probe_kernel_runs_under_the_interpreter():
    probe.run(torch.device("cpu"))  # TRITON_INTERPRET=1 (conftest): the kernel's code itself is right


def test_failed_compile_turns_every_kernel_off_with_one_warning(fake_gpu, monkeypatch, caplog):
    calls = _probe_calls(monkeypatch, RuntimeError(NO_COMPILER))
    caplog.set_level(logging.WARNING, logger=support.__name__)
    for check in (triton_available, int8_kernel_available, fused_rms_norm_available, lora_kernel_available):
        for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
            assert not check(device), (check.__name__, device)
    assert calls == [torch.device("cuda", 0)]  # compiled once for the process, whoever asks
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "Triton kernels off on cuda:0" in warnings[0] and NO_COMPILER in warnings[0]
    assert "apt-get install gcc python3-dev" in warnings[0] and "CC" in warnings[0]


def test_a_multiline_cause_is_one_bounded_line(fake_gpu, monkeypatch, caplog):
    command = ["/usr/bin/cc", "/tmp/launcher.c", "-O3", "-shared", *(f"-I/include/{i}" for i in range(100))]
    _probe_calls(monkeypatch, subprocess.CalledProcessError(1, command, stderr="fatal error:\nPython.h"))
    caplog.set_level(logging.WARNING, logger=support.__name__)
    assert not triton_available("cuda")
    [warning] = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and "CalledProcessError: Command '['/usr/bin/cc'" in warning
    assert len(warning) < 600


def test_a_kernel_that_compiles_is_used(fake_gpu, monkeypatch, caplog):
    calls = _probe_calls(monkeypatch, None)
    assert triton_available("cuda") and int8_kernel_available("cuda:0") and lora_kernel_available("cuda")
    assert len(calls) == 1 and not caplog.records


def test_old_gpus_and_the_cpu_never_compile(fake_gpu, monkeypatch):
    calls = _probe_calls(monkeypatch, None)
    assert not triton_available("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not triton_available("cuda")
    assert calls == []


def test_engine_swaps_follow_the_compile_check(fake_gpu, tiny_model_dir, monkeypatch):
    """The engine's start-up swaps read the check: a failed compile leaves transformers' norms and
    bitsandbytes' int8 layers in place (the PyTorch paths); a working one swaps the norms."""
    base = load_base_model(tiny_model_dir, "none", "cpu", "float32")
    on_gpu = SimpleNamespace(model=base.model, device=torch.device("cuda", 0), quantization="int8")
    _probe_calls(monkeypatch, RuntimeError(NO_COMPILER))
    assert use_fused_norms(on_gpu, enabled=True) == 0 and use_int8_kernel(on_gpu, enabled=True) == 0
    assert {type(m).__name__ for m in base.model.modules() if "RMSNorm" in type(m).__name__} == {"LlamaRMSNorm"}
    support._compile_problem.cache_clear()
    _probe_calls(monkeypatch, None)
    assert use_fused_norms(on_gpu, enabled=True) == 2 * base.num_layers + 1


# The GPU check: the engine in a fresh process whose Triton cannot find a compiler (CC is /bin/false, PATH
# holds none, and Triton's cache is a new empty folder, so that no launcher compiled earlier is reused). The
# references (plain transformers + PEFT, no Triton) are computed in that process too, on the same device.
_ENGINE = """
import json, sys
from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import reference_greedy
from tests.server.engine.test_parity import run_together

model_dir, root, quantization, jobs, new = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), 6
jobs = [tuple(job) for job in jobs]
base = load_base_model(model_dir, quantization, "cuda", "float32")
runtime = Runtime(base, root, EngineConfig(max_batch_size=8, fused_kernels=True))
try:
    results = run_together(runtime, jobs, GenerationParams(max_new_tokens=new))
finally:
    runtime.close()
refs = [reference_greedy(model_dir, p, f"{root}/{a}" if a else None, new, quantization) for p, a in jobs]
runner = runtime.engine.runner
print(json.dumps({"fused_norms": runner.fused_norms, "int8_layers": runner.int8_kernel_layers,
                  "tokens": [events[-1].token_ids for events in results], "refs": refs}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_engine_without_a_compiler_serves_pefts_tokens(tiny_model_dir, adapter_root, tmp_path, quantization):
    jobs = [(prompt, adapter) for prompt in ("hello world", "你是谁？") for adapter in ("", "lora-qv", "prefix")]
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    # adapterd comes from the install (the repository root is the package's contents, not its parent: a
    # PYTHONPATH of the root hid the install on the GPU machine); `tests` from the working directory.
    env = {**os.environ, "CC": "/bin/false", "PATH": str(empty_bin), "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "ADAPTERD_TEST_DEVICE": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _ENGINE, str(tiny_model_dir), str(adapter_root), quantization,
                          json.dumps(jobs)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fused_norms"] == 0 and result["int8_layers"] == 0
    warnings = [line for line in out.stderr.splitlines() if "Triton kernels off on cuda:" in line]
    assert len(warnings) == 1 and "/bin/false" in warnings[0], out.stderr[-3000:]
    assert result["tokens"] == result["refs"]


def test_pdl_only_on_hopper_and_compiled_and_not_switched_off(monkeypatch):
    """Programmatic dependent launch: never off CUDA or in the interpreter (no launch options there), and the
    benches' ``ADAPTERD_PDL=0`` turns it off; the launch keywords are empty where it is off."""
    from adapterd.server.kernels import support

    assert not support.pdl_enabled("cpu") and support.pdl_launch("cpu") == {}
    monkeypatch.setattr(support, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ADAPTERD_PDL", raising=False)
    assert support.pdl_enabled("cuda:0") and support.pdl_launch("cuda:0") == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setenv("ADAPTERD_PDL", "0")
    assert not support.pdl_enabled("cuda:0")
    monkeypatch.setenv("ADAPTERD_PDL", "1")
    monkeypatch.setattr(support, "_capability", lambda index: (8, 0))
    assert not support.pdl_enabled("cuda:0")  # an A100: no PDL
    monkeypatch.setattr(support, "_capability", lambda index: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not support.pdl_enabled("cuda:0")


def test_tuner_choices_name_each_key_and_config():
    """What serve_bench prints of an autotuner: its cached choices keyed by the joined key; none without a tuner
    (the interpreter builds none)."""
    from adapterd.server.kernels.support import tuner_choices

    class Tuner:
        cache = {(1, 4096, "torch.bfloat16"): "BLOCK_N: 8, BLOCK_K: 1024"}

    assert tuner_choices(Tuner()) == {"1, 4096, torch.bfloat16": "BLOCK_N: 8, BLOCK_K: 1024"}
    assert tuner_choices(None) == {}


@pytest.mark.gpu
def test_gpu_graph_us_times_the_device_only():
    """``graph_us`` (the GEMV warm-up's judge) counts what a captured step runs, not the host's time around a
    launch: a call that sleeps 5 ms on the host before a tiny kernel is timed in microseconds, and calls cycle
    over the list given."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import time

    from adapterd.server.kernels.support import graph_us

    x = torch.zeros(1024, device="cuda")
    seen = []

    def call(i: int) -> None:
        seen.append(i)
        time.sleep(0.005)
        x.add_(1.0)

    us = graph_us([lambda: call(0), lambda: call(1)], per_graph=4, replays=3)
    assert 0 < us < 1000, us  # the sleeps (5,000 us a call) are not in it
    assert seen == [0, 1, 0, 1, 0, 1, 0, 1]  # twice each to warm up, then the capture's four
    torch.cuda.synchronize()
    assert x[0].item() == 4 + 4 * (1 + 3)  # the warm-up's 4, then the graph's 4 a replay: upload + 3 timed


@pytest.mark.gpu
def test_gpu_quick_bench_times_a_call_from_hbm_without_host_time():
    """The autotuners' timer: a call that sleeps 5 ms on the host before its kernel is timed in microseconds
    (ms returned), a 64 MB read takes longer than a 1 MB one (the flush before each call leaves neither in L2),
    with quantiles one figure a quantile, as ``triton.autotune`` compares them, and the 256 MB flush buffer is
    not held after the call (the daemon's memory after start-up is the pool's)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import time

    from adapterd.server.kernels.support import quick_bench

    small = torch.ones(1 << 18, device="cuda")  # 1 MB
    large = torch.ones(1 << 24, device="cuda")  # 64 MB
    out = torch.empty((), device="cuda")

    def sleepy() -> None:
        time.sleep(0.005)
        torch.sum(small, dim=0, out=out)

    held = torch.cuda.memory_allocated()
    assert 0 <= quick_bench(sleepy) < 0.5
    assert torch.cuda.memory_allocated() == held
    times = quick_bench(lambda: torch.sum(large, dim=0, out=out), (0.5, 0.2, 0.8))
    assert len(times) == 3 and len(set(times)) == 1
    assert times[0] > quick_bench(lambda: torch.sum(small, dim=0, out=out))
