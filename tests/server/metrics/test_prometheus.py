"""A real Prometheus (Debian's ``prometheus`` package) on loopback scrapes the daemon every second; a metric
is read back through its HTTP API, and every dashboard expression evaluates there without error."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.server.metrics.conftest import free_port, samples, value
from tests.server.metrics.dashboard import expressions, load_dashboard

WAIT_S = 60.0


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def _query(base: str, expr: str) -> dict:
    return _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


@pytest.fixture(scope="module")
def prometheus(metrics_daemon, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: adapterd\n    scrape_timeout: 1s\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_daemon.metrics_port}']\n")
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, proc, work / "prometheus.log"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _wait_for(base: str, proc: subprocess.Popen, logfile, expr: str) -> list:
    deadline = time.monotonic() + WAIT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}: {logfile.read_text()[-2000:]}")
        try:
            answer = _query(base, expr)
            result = answer["data"]["result"]
            if result:
                return result
            last = answer
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.5)
    pytest.fail(f"no result for {expr} within {WAIT_S:.0f} s (last: {last}); log: {logfile.read_text()[-2000:]}")


def test_prometheus_scrapes_the_daemon(prometheus, metrics_daemon):
    base, proc, logfile = prometheus
    up = _wait_for(base, proc, logfile, 'up{job="adapterd"} == 1')
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{metrics_daemon.metrics_port}"
    result = _wait_for(base, proc, logfile, "adapterd_generation_tokens_total")
    direct = value(samples(metrics_daemon.scrape()), "adapterd_generation_tokens_total")
    assert float(result[0]["value"][1]) == direct == metrics_daemon.traffic.generated_tokens
    by_code = _wait_for(base, proc, logfile, 'sum by (code) (adapterd_rpc_requests_total{method="Generate"})')
    codes = {r["metric"]["code"]: float(r["value"][1]) for r in by_code}
    assert codes["NOT_FOUND"] == 1 and codes["OK"] >= 1


def test_dashboard_expressions_evaluate(prometheus):
    base, proc, logfile = prometheus
    _wait_for(base, proc, logfile, "adapterd_build_info")
    for expr in expressions(load_dashboard()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        answer = _query(base, concrete)
        assert answer["status"] == "success", (expr, answer)
