"""The client path imports without torch (or transformers)."""

from __future__ import annotations

import subprocess
import sys


def test_clients_import_without_torch():
    code = ("import sys; import adapterd.clients, adapterd.clients.cli_generate, adapterd.clients.cli_adapters, "
            "adapterd.clients.cli_chat; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_request_defaults_mean_server_defaults():
    from adapterd.clients import generate_request

    req = generate_request("hi", "a/b", max_new_tokens=5, seed=0, stop_sequences=["\n"])
    assert req.prompt == "hi" and req.adapter_id == "a/b"
    assert req.sampling.HasField("seed") and req.sampling.seed == 0
    assert req.sampling.temperature == 0.0 and list(req.stopping.stop_sequences) == ["\n"]
    assert not generate_request("hi").sampling.HasField("seed")
