"""The deploy/ files, loaded once for the tests of tests/deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def find(kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name`` in deploy/kubernetes."""
    matches = [doc for path in MANIFESTS for doc in load_documents(path)
               if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container_args(pod_spec: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` arguments of the pod's first container, as a dict."""
    pairs = (arg.removeprefix("--").split("=", 1) for arg in pod_spec["containers"][0]["args"])
    return {key: value for key, value in pairs}


@pytest.fixture(scope="session")
def envoy_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
