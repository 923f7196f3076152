"""Which chat template renders a conversation: the adapter's, else the base tokenizer's, else the Alpaca
default that adapterd's trainer formats examples with."""

from __future__ import annotations

import pytest

from adapterd.server.chat import render, template_for
from adapterd.server.errors import FailedPrecondition, InvalidArgument
from adapterd.trainer.data import format_prompt

USER = [{"role": "user", "content": "你是谁？"}]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_adapters_template_first_then_the_bases_then_alpaca(tokenizer):
    assert render(tokenizer, USER, template_for(None, tokenizer), "base") == format_prompt("你是谁？")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert render(tokenizer, USER, template_for(None, tokenizer), "base") == "[你是谁？]"
    assert render(tokenizer, USER, template_for("<{{ messages[0]['content'] }}>", tokenizer), "a") == "<你是谁？>"


def test_template_failures_are_the_callers_or_the_templates(tokenizer):
    with pytest.raises(InvalidArgument) as refused:
        render(tokenizer, USER, "{{ raise_exception('one user message only') }}", "adapter 'x'")
    assert refused.value.field == "messages" and "one user message only" in refused.value.message
    with pytest.raises(FailedPrecondition, match="adapter 'x' is not valid Jinja"):
        render(tokenizer, USER, "{% if %}", "adapter 'x'")
    with pytest.raises(FailedPrecondition, match=r"adapter 'x' failed on these messages \(TypeError\)"):
        render(tokenizer, USER, "{{ messages[0]['content'] + 1 }}", "adapter 'x'")


def test_the_sandbox_keeps_templates_from_python_objects(tokenizer):
    """Templates come from tenants' adapter directories: transformers renders them in Jinja's sandbox."""
    with pytest.raises(FailedPrecondition):
        render(tokenizer, USER, "{{ messages.__class__.__mro__[1].__subclasses__() }}", "adapter 'x'")


def test_a_template_that_never_ends_is_stopped(tokenizer, monkeypatch):
    """Nested loops (each within the sandbox's range bound) would hold a tokenizing lane for hours."""
    import time

    from adapterd.server import chat

    monkeypatch.setattr(chat, "MAX_RENDER_S", 0.5)
    started = time.monotonic()
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(FailedPrecondition, match="adapter 'x' took longer than 0.5 s to render"):
        render(tokenizer, USER, endless, "adapter 'x'")
    assert time.monotonic() - started < 5
    assert render(tokenizer, USER, "{{ messages[0]['content'] }}", "adapter 'x'") == "你是谁？"  # tracing is off
