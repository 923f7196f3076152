"""/metrics of a daemon that served known traffic: counts by adapter and code, token counters, histograms,
adapter and training series, no GPU series without a GPU, and a clean ``promtool check metrics``."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.server.metrics.conftest import samples, value

SERVICE = "adapterd.v1.Adapterd"


@pytest.fixture(scope="module")
def parsed(metrics_daemon):
    return samples(metrics_daemon.scrape())


def test_rpcs_counted_by_method_adapter_and_code(metrics_daemon, parsed):
    for (method, adapter), n in metrics_daemon.traffic.ok.items():
        assert value(parsed, "adapterd_rpc_requests_total", service=SERVICE, method=method, adapter=adapter,
                     code="OK") == n, (method, adapter)
    # Ids that never loaded never get a label of their own.
    assert value(parsed, "adapterd_rpc_requests_total", method="Generate", code="NOT_FOUND", adapter="other") == 1
    assert value(parsed, "adapterd_rpc_requests_total", method="Generate", code="INVALID_ARGUMENT",
                 adapter="other") == 1
    assert value(parsed, "adapterd_rpc_requests_total", method="LoadAdapter", code="DATA_LOSS") == 1
    labels = {dict(ls).get("adapter") for (n, ls) in parsed if n == "adapterd_rpc_requests_total"}
    assert "does-not-exist" not in labels and "../escape" not in labels
    ok_generate = sum(n for (m, _), n in metrics_daemon.traffic.ok.items() if m == "Generate")
    assert value(parsed, "adapterd_rpc_duration_seconds_count", method="Generate") == ok_generate + 2


def test_generation_requests_by_adapter_and_reason(metrics_daemon, parsed):
    by_adapter: dict[str, int] = {}
    for (_, adapter), n in metrics_daemon.traffic.ok.items():
        by_adapter[adapter] = by_adapter.get(adapter, 0) + n
    for adapter, n in by_adapter.items():
        assert value(parsed, "adapterd_generation_requests_total", adapter=adapter) == n, adapter
    assert value(parsed, "adapterd_generation_requests_total") == metrics_daemon.traffic.engine_requests
    reasons = {dict(ls)["finished_reason"] for (n, ls) in parsed if n == "adapterd_generation_requests_total"}
    assert reasons <= {"max_tokens", "eos_token", "stop_sequence", "token_limit"}


def test_token_counters_match_the_responses(metrics_daemon, parsed):
    traffic = metrics_daemon.traffic
    assert value(parsed, "adapterd_prompt_tokens_total") == traffic.prompt_tokens
    assert value(parsed, "adapterd_generation_tokens_total") == traffic.generated_tokens > 0


def test_latency_histograms_observed(metrics_daemon, parsed):
    n = metrics_daemon.traffic.engine_requests
    for name in ("adapterd_time_to_first_token_seconds", "adapterd_e2e_request_latency_seconds",
                 "adapterd_request_queue_time_seconds"):
        assert value(parsed, f"{name}_count") == n, name
        assert value(parsed, f"{name}_sum") > 0 or name.endswith("queue_time_seconds")
        assert value(parsed, f"{name}_bucket", le="+Inf") == n
    tpot = value(parsed, "adapterd_time_per_output_token_seconds_count")
    assert 0 < tpot <= n
    assert value(parsed, "adapterd_batch_size_count") > 0
    assert value(parsed, "adapterd_requests_running") == 0
    assert value(parsed, "adapterd_requests_waiting") == 0


def test_adapter_series(parsed):
    assert value(parsed, "adapterd_adapter_loads_total", type="LORA") == 2
    assert value(parsed, "adapterd_adapter_loads_total", type="PREFIX_TUNING") == 1
    assert value(parsed, "adapterd_adapter_load_failures_total", code="DATA_LOSS") == 1
    assert value(parsed, "adapterd_adapter_load_seconds_count") == 4
    assert value(parsed, "adapterd_adapters_resident", tier="cpu") == 3  # CPU daemon: nothing on a GPU
    assert value(parsed, "adapterd_adapters_resident", tier="gpu") == 0
    assert value(parsed, "adapterd_lora_slots_used") == 2
    assert value(parsed, "adapterd_lora_slot_fills_total") == 2
    assert value(parsed, "adapterd_adapter_evictions_total") == 0
    assert value(parsed, "adapterd_lora_slots") >= 2
    # A CPU daemon reads files into pageable pool buffers, lent to the 3 loaded adapters, none past the cap
    assert value(parsed, "adapterd_host_buffer_pool_bytes", state="lent") > 0
    assert value(parsed, "adapterd_host_buffer_pool_fallbacks_total") == 0


def test_engine_series(parsed):
    """A CPU daemon captures no CUDA graph and swaps in none of the GPU kernels: every series is there, at 0."""
    for kind in ("decode", "prefill"):
        assert value(parsed, "adapterd_cuda_graphs", kind=kind) == 0
        assert value(parsed, "adapterd_cuda_graph_captures_total", kind=kind) == 0
        assert value(parsed, "adapterd_cuda_graph_capture_seconds_total", kind=kind) == 0
    for kernel in ("int8_matmul", "rms_norm"):
        assert value(parsed, "adapterd_kernel_swapped_modules", kernel=kernel) == 0


def test_build_info(parsed, tiny_model_dir):
    info = [dict(ls) for (n, ls), v in parsed.items() if n == "adapterd_build_info" and v == 1]
    assert info == [{"version": __import__("adapterd.common").common.__version__, "base_model": tiny_model_dir.name,
                     "quantization": "none"}]


def test_training_series_from_status_files(parsed):
    assert value(parsed, "adapterd_training_step", run_id="run-a") == 40
    assert value(parsed, "adapterd_training_total_steps", run_id="run-a") == 100
    assert value(parsed, "adapterd_training_loss", run_id="run-a") == 1.25
    assert value(parsed, "adapterd_training_eta_seconds", run_id="run-a") == 90.5
    assert value(parsed, "adapterd_training_tokens_per_second", run_id="run-a") == 1234.5
    assert value(parsed, "adapterd_training_state", run_id="run-a", state="running") == 1
    assert value(parsed, "adapterd_training_state", run_id="run-a", state="pending") == 0
    assert value(parsed, "adapterd_training_state", run_id="run-b", state="pending") == 1
    # Unknown values (null in status.json) are absent, never 0.
    names = {(n, dict(ls).get("run_id")) for (n, ls) in parsed}
    assert ("adapterd_training_loss", "run-b") not in names
    assert ("adapterd_training_eta_seconds", "run-b") not in names
    assert not any(run == "not-a-run" for _, run in names)


def test_gpu_series_absent_without_a_gpu(metrics_daemon):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: GPU series are expected here")
    text = metrics_daemon.scrape()
    gpu_lines = [line for line in text.splitlines()
                 if "adapterd_gpu_" in line or "adapterd_torch_cuda_" in line]
    assert gpu_lines == []


def test_promtool_check_metrics_is_clean(metrics_daemon):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    text = metrics_daemon.scrape()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
