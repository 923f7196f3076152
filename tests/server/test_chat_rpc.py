"""Chat messages over gRPC: rendered with the adapter's template, else the base's, else the Alpaca default;
the same tokens as the rendered prompt sent as is; errors naming the field."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from adapterd.trainer.data import format_prompt
from tests.server.conftest import start_daemon
from tests.server.test_adapters_rpc import bad_field, code_of

USER = [{"role": "user", "content": "你是谁？"}]
# A template of another family's shape (ChatML-like), as an adapter trained elsewhere may carry.
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_root(served_root):
    """The served root plus adapters carrying templates: one as transformers saves it now
    (chat_template.jinja), one as it did before (tokenizer_config.json), one broken, one that refuses."""
    def copy(name: str) -> object:
        target = served_root / "chat" / name
        shutil.copytree(served_root / "lora-qv", target)
        return target

    (copy("jinja") / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    (copy("legacy") / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}))
    (copy("broken") / "chat_template.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    (copy("refusing") / "chat_template.jinja").write_text(
        "{{ raise_exception('roles must alternate user/assistant') }}", encoding="utf-8")
    return served_root


@pytest.fixture(scope="module")
def chat_client(tiny_model_dir, chat_root):
    from adapterd.clients import AdapterdClient

    d = start_daemon(tiny_model_dir, chat_root, max_input_tokens=200)
    with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60) as c:
        yield c
    d.stop()


@pytest.mark.parametrize("adapter_id", ["", "lora-qv", "prefix"])
def test_messages_without_a_template_use_the_alpaca_default(chat_client, adapter_id):
    """The tiny base has no chat template and these adapters none: the Alpaca prompt adapterd trains with, so
    the answer is the raw prompt's (whose tokens the parity tests check against PEFT)."""
    raw = chat_client.generate(format_prompt("你是谁？"), adapter_id, max_new_tokens=12)
    chat = chat_client.chat(USER, adapter_id, max_new_tokens=12)
    assert chat.text == raw.text and chat.input_token_count == raw.input_token_count
    rendered = chat_client.tokenize(messages=USER, adapter_id=adapter_id).rendered_prompt
    assert rendered == format_prompt("你是谁？")


@pytest.mark.parametrize("adapter_id", ["chat/jinja", "chat/legacy"])
def test_an_adapters_own_template_renders_its_messages(chat_client, adapter_id):
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    expected = "<|system|>Be brief.\n<|user|>你是谁？\n<|assistant|>"
    tokens = chat_client.tokenize(messages=messages, adapter_id=adapter_id, return_tokens=True)
    assert tokens.rendered_prompt == expected
    assert list(tokens.token_ids) == list(chat_client.tokenize(expected, return_tokens=True).token_ids)
    chat = chat_client.chat(messages, adapter_id, max_new_tokens=12)
    assert chat.text == chat_client.generate(expected, adapter_id, max_new_tokens=12).text
    streamed = list(chat_client.chat_stream(messages, adapter_id, max_new_tokens=12))
    assert "".join(m.text for m in streamed) == chat.text and streamed[-1].stop_reason == chat.stop_reason


def test_a_multi_turn_conversation_follows_the_alpaca_turns(chat_client):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    rendered = chat_client.tokenize(messages=messages).rendered_prompt
    assert rendered == "S\n\n### Instruction:\na\n\n### Response:b</s>\n\n### Instruction:\nc\n\n### Response:"


def test_bad_messages_name_their_field(chat_client):
    assert bad_field(chat_client.generate, "hi", messages=USER) == "messages"
    assert bad_field(chat_client.chat, [{"role": "tool", "content": "x"}]) == "messages[0].role"
    assert bad_field(chat_client.chat, [*USER, {"role": "robot", "content": "x"}]) == "messages[1].role"
    assert bad_field(chat_client.generate, "") == "prompt"
    assert bad_field(chat_client.chat, [{"role": "user", "content": "word " * 2000}]) == "messages"
    assert bad_field(chat_client.tokenize, "hi", messages=USER) == "messages"
    assert bad_field(chat_client.chat, USER, "../x") == "adapter_id"


def test_a_template_that_refuses_or_breaks_says_so(chat_client):
    code, message = code_of(chat_client.chat, USER, "chat/refusing")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "roles must alternate user/assistant" in message
    assert "messages" in message
    code, message = code_of(chat_client.chat, USER, "chat/broken")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'chat/broken'" in message and "Jinja" in message
    # The adapter itself still serves raw prompts.
    assert chat_client.generate("hi", "chat/broken", max_new_tokens=2).generated_token_count > 0
    code, _ = code_of(chat_client.chat, USER, "no-such-adapter")
    assert code == grpc.StatusCode.NOT_FOUND
