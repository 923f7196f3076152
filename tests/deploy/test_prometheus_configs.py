"""deploy's Prometheus scrape configurations pass ``promtool check config`` (Debian's ``prometheus`` package,
which .ci/run installs), and the Kubernetes one asks the DNS names the manifests create."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, find

CONFIGS = ["prometheus.yml", "prometheus-kubernetes.yml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_promtool_accepts_the_config(name):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_job_asks_the_headless_services_metrics_port():
    (job,) = yaml.safe_load((DEPLOY / "prometheus-kubernetes.yml").read_text())["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    service = find("Service", "adapterd-headless")
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert "metrics" in port_names
    assert dns["type"] == "SRV"
    assert dns["names"] == [f"_metrics._tcp.adapterd-headless.{service['metadata']['namespace']}.svc.cluster.local"]
