"""The daemon ignores the balancer's ``x-adapter-id`` header (deploy/SCALING.md says why): what it serves is
the request body's adapter_id, whatever the header says, so a wrong header costs at most a cold load on the
replica it routed to, never a wrong answer."""

from __future__ import annotations

import pytest

from adapterd.clients import ADAPTER_ID_HEADER, AdapterdClient, generate_request
from tests.server.conftest import start_daemon

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapter_root):
    daemon = start_daemon(tiny_model_dir, adapter_root)
    try:
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=60) as client:
            yield client
    finally:
        daemon.stop()


def _text(client: AdapterdClient, adapter_id: str, header: str | None) -> str:
    """Greedy answer for ``adapter_id`` in the body, sent with exactly ``header`` (or none) as x-adapter-id."""
    metadata = [(ADAPTER_ID_HEADER, header)] if header is not None else []
    request = generate_request(PROMPT, adapter_id, max_new_tokens=8)
    return client.stub.Generate(request, metadata=metadata, timeout=60).text


@pytest.mark.parametrize(("body", "header"), [("lora-qv", "prefix"), ("lora-qv", ""), ("", "lora-qv"),
                                              ("prefix", "no/such/adapter")])
def test_the_body_decides_whatever_the_header_says(served, body, header):
    assert _text(served, body, header) == _text(served, body, None)


def test_the_adapters_differ_so_the_comparison_can_fail(served):
    answers = {_text(served, adapter_id, None) for adapter_id in ("", "lora-qv", "prefix")}
    assert len(answers) == 3
