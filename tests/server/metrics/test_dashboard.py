"""The Grafana dashboard names only metrics the daemon exports, takes its datasource as ${DS_PROMETHEUS},
and has the panels the issue asks for."""

from __future__ import annotations

from adapterd.server.metrics import DaemonMetrics
from tests.server.metrics.dashboard import expressions, load_dashboard, metric_names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, method) (rate(adapterd_rpc_duration_seconds_bucket'
            '{instance=~"$instance", method=~"Generate|x"}[$__rate_interval]))) / on(instance) foo:bar == 1')
    assert metric_names(expr) == {"adapterd_rpc_duration_seconds_bucket", "foo:bar"}


def test_dashboard_uses_only_exported_metrics():
    exported = DaemonMetrics(gpu=True).metrics.exported_names()
    used: set[str] = set()
    for expr in expressions(load_dashboard()):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        used |= names
    unknown = used - exported
    assert not unknown, f"the dashboard queries metrics the daemon does not export: {sorted(unknown)}"
    # The panels: tokens/s, TTFT and TPOT, requests by adapter and code, adapter cache, GPU, training.
    for needed in ("adapterd_generation_tokens_total", "adapterd_time_to_first_token_seconds_bucket",
                   "adapterd_time_per_output_token_seconds_bucket", "adapterd_rpc_requests_total",
                   "adapterd_adapters_resident", "adapterd_adapter_evictions_total",
                   "adapterd_gpu_utilization_ratio", "adapterd_gpu_memory_used_bytes",
                   "adapterd_gpu_temperature_celsius", "adapterd_gpu_power_watts", "adapterd_training_step",
                   "adapterd_training_loss", "adapterd_training_eta_seconds"):
        assert needed in used, needed


def test_dashboard_datasource_is_an_input():
    dashboard = load_dashboard()
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    quantiles = " ".join(expressions(dashboard))
    assert "histogram_quantile(0.5," in quantiles and "histogram_quantile(0.95," in quantiles
