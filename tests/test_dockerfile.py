"""The Dockerfile (no Docker engine runs here): it installs what the README's set-up installs, pinned at
versions inside pyproject's tested ranges, runs as a non-root user, and its HEALTHCHECK command works."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from adapterd.server.app import DaemonThread
from adapterd.server.config import ServerConfig
from tests.helpers import TEST_DEVICE

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "deploy" / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_every_dependency_is_pinned_inside_its_tested_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in project["dependencies"] + project["optional-dependencies"]["server"]:
        req = Requirement(spec)
        assert req.name.lower() in pins, f"{req.name} is not pinned for the image"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req.name}=={pins[req.name.lower()]} vs {req}"


def test_image_copies_every_package_folder_and_runs_unprivileged():
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in {d.split("/")[0] for d in dirs}:
        assert re.search(rf"^COPY {folder} ", DOCKERFILE, re.M), folder
    assert "--constraint deploy/constraints-gpu.txt" in DOCKERFILE and "'.[server]'" in DOCKERFILE
    user = re.search(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[1] not in ("root", "0")
    assert re.search(r'^VOLUME \["/srv/adapters", "/srv/runs"\]', DOCKERFILE, re.M)
    assert re.search(r'HEALTHCHECK .*\n\s+CMD \["adapterd", "health"', DOCKERFILE)


def _health(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterd.cli", "health", "--target", f"127.0.0.1:{port}",
                           "--timeout", "5"], capture_output=True, text=True, timeout=60)


def test_health_command_follows_the_daemon(tiny_model_dir, adapter_root):
    d = DaemonThread(ServerConfig(base=tiny_model_dir, adapters=adapter_root, quantization="none", port=0,
                                  device=TEST_DEVICE, dtype="float32"))
    d.start(load=False)
    try:
        loading = _health(d.port)
        assert loading.returncode == 1 and "NOT_SERVING" in loading.stdout
        d.run(d.daemon.load())
        ready = _health(d.port)
        assert ready.returncode == 0 and "SERVING" in ready.stdout
        port = d.port
    finally:
        d.stop()
    assert _health(port).returncode == 1
