"""Start-up refusal: a base whose config asks for something the engine does not reproduce is refused with one
line naming the config field, before any weight is read; through ``adapterd serve``, exit 1 and that line."""

from __future__ import annotations

import subprocess

import pytest
from transformers import AutoConfig

from adapterd.server.architecture import FULL, SLIDING, UnsupportedModel, check_config
from tests.helpers import CLI, ENV

REFUSED = [
    ("gemma2", {}, "config.attn_logit_softcapping"),
    ("gemma", {"final_logit_softcapping": 30.0}, "config.final_logit_softcapping"),
    ("gemma3_text", {"attn_logit_softcapping": None, "final_logit_softcapping": None}, "config.model_type"),
    ("gpt2", {}, "config.model_type 'gpt2'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "config.rope_parameters.rope_type 'dynamic'"),
    ("mistral", {"partial_rotary_factor": 0.5}, "config.partial_rotary_factor"),
    ("llama", {"sliding_window": 16}, "config.sliding_window"),
    ("llama", {"attention_chunk_size": 8}, "config.attention_chunk_size"),
    ("qwen2", {"num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]},
     "config.layer_types"),
]


@pytest.mark.parametrize(("model_type", "fields", "named"), REFUSED)
def test_what_the_engine_does_not_reproduce_is_refused_naming_the_field(model_type, fields, named):
    with pytest.raises(UnsupportedModel) as refused:
        check_config(AutoConfig.for_model(model_type, **fields))
    assert named in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("model_type", "fields", "windows"), [
    ("llama", {}, {FULL: None}),
    ("mistral", {"sliding_window": None}, {FULL: None}),
    ("mistral", {"sliding_window": 4096}, {SLIDING: 4096}),  # Mistral-7B-v0.1: every layer slides
    ("phi3", {"sliding_window": 2047}, {SLIDING: 2047}),  # Phi-3-mini-4k
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4096}, {FULL: None}),  # Qwen2's default: off
    ("qwen3", {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2},
     {FULL: None, SLIDING: 64}),
])
def test_windows_are_read_as_transformers_applies_them(model_type, fields, windows):
    assert check_config(AutoConfig.for_model(model_type, **fields)).windows == windows


def test_serve_exits_1_naming_the_field_before_loading_weights(tmp_path):
    """A Gemma 2 base (attention logit soft-capping) stops ``adapterd serve`` with one log line saying why."""
    from adapterd.common.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "gemma2", model_type="gemma2", head_dim=16)
    (base / "model.safetensors").write_bytes(b"not read: the config is refused first")
    (tmp_path / "adapters").mkdir()
    out = subprocess.run([*CLI, "serve", "--base", str(base), "--adapters", str(tmp_path / "adapters"),
                          "--quantization", "none", "--port", "0"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if "attn_logit_softcapping" in line]
    assert len(lines) == 1 and "cannot load the base model" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
