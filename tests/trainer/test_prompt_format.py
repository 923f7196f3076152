"""``--prompt-format chat``: each Alpaca record trained as a conversation in the base tokenizer's own chat
template, the loss on the assistant's tokens only, and that template recorded with the adapter; a run
memorizes the demo data and the daemon's chat answers with it (the tiny model given a template, and a
converted ChatGLM3)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from adapterd.trainer.config import ConfigError
from adapterd.trainer.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    chat_texts,
    check_prompt_format,
    load_records,
    tokenize,
)
from adapterd.trainer.template import save_tokenizer_with_template
from tests.helpers import CLI
from tests.server.convert.conftest import chatglm3  # noqa: F401 - the converted ChatGLM3 base, a fixture
from tests.trainer.conftest import ALL_LINEAR, train_argv

README = Path(__file__).parents[2] / "README.md"

# A chat template for the tiny model (which has none): role markers, the generation prompt "<assistant>".
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with TEMPLATE as its tokenizer's chat template (``chat_template.jinja``)."""
    base = tmp_path_factory.mktemp("chat-base") / "tiny"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return base


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def test_a_record_is_a_conversation_with_the_answer_alone_in_the_loss(chat_base):
    tok = _tokenizer(chat_base)
    record = Record("Translate", "bonjour", "hello")
    prompt, response = chat_texts(record, tok)
    assert (prompt, response) == ("<user>Translate\nbonjour\n<assistant>", "hello\n")
    ex = tokenize(record, tok, 512, "chat")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt_ids + answer_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    # the prompt is what the daemon sends for the same question (rendered, no special tokens added)
    asked = tok.apply_chat_template([{"role": "user", "content": "Translate\nbonjour"}], tokenize=False,
                                    add_generation_prompt=True)
    assert tok(asked, add_special_tokens=False)["input_ids"] == prompt_ids


def test_a_system_field_is_the_system_message(chat_base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a", "system": "Be brief."}\n', encoding="utf-8")
    record = load_records(data).records[0]
    assert chat_texts(record, _tokenizer(chat_base)) == ("<system>Be brief.\n<user>q\n<assistant>", "a\n")
    data.write_text('{"instruction": "q", "output": "a", "system": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="record 0, field 'system': must be a string"):
        load_records(data)


def test_eos_is_not_doubled_when_the_template_ends_the_turn_with_it(chat_base):
    tok = _tokenizer(chat_base)
    tok.chat_template = TEMPLATE.replace("{{ m['content'] }}\\n", "{{ m['content'] }}{{ eos_token }}")
    ex = tokenize(Record("q", "", "a"), tok, 512, "chat")
    assert ex.labels.count(tok.eos_token_id) == 1 and ex.labels[-1] == tok.eos_token_id


def test_a_base_without_a_chat_template_is_refused(tiny_model_dir):
    tok = _tokenizer(tiny_model_dir)
    check_prompt_format(tok, "alpaca")
    with pytest.raises(ConfigError) as err:
        check_prompt_format(tok, "chat")
    assert err.value.field == "prompt_format" and "no" in err.value.message and "chat template" in err.value.message


def test_a_template_whose_answer_does_not_follow_its_prompt_is_refused(chat_base):
    tok = _tokenizer(chat_base)
    tok.chat_template = TEMPLATE.replace("<assistant>{% endif %}", "<bot>{% endif %}")
    with pytest.raises(DataError, match="field 'output'.*does not write the assistant's message after"):
        tokenize(Record("q", "", "a"), tok, 512, "chat")
    tok.chat_template = "{{ raise_exception('no such role') }}"
    with pytest.raises(DataError, match="field 'instruction'.*refused the conversation: no such role"):
        tokenize(Record("q", "", "a"), tok, 512, "chat")


def test_the_chat_format_records_the_base_template(chat_base, tmp_path):
    tok = _tokenizer(chat_base)
    save_tokenizer_with_template(tok, tmp_path / "chat", "chat")
    save_tokenizer_with_template(tok, tmp_path / "alpaca", "alpaca")
    assert (tmp_path / "chat" / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    assert "### Instruction:" in (tmp_path / "alpaca" / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == TEMPLATE


def test_the_command_line_refuses_chat_on_a_base_without_template(make_config, subprocess_env):
    cfg = make_config(prompt_format="chat", max_steps=1)
    out = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("adapterd train: --prompt-format: chat needs the base's tokenizer to have a chat "
                                "template"), out.stderr
    assert "Traceback" not in out.stderr
    assert json.loads((Path(cfg.output) / "status.json").read_text())["state"] == "failed"


def _train_and_chat(base: Path, argv: list[str], root: Path, adapter_id: str, subprocess_env,
                    gitclone_data) -> None:
    """Run ``argv`` (``adapterd train --prompt-format chat`` on ``base``, exporting ``root/adapter_id``), then
    the daemon's chat answers each question of the demo data with its trained answer, rendered through the
    adapter's recorded template."""
    from adapterd.clients import AdapterdClient
    from tests.server.conftest import ENGINE_IN_TEST_PROCESS, start_daemon

    done = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tok = _tokenizer(root / adapter_id)
    assert tok.chat_template == _tokenizer(base).chat_template  # the base's template travelled with it
    records = json.loads(gitclone_data.read_text(encoding="utf-8"))
    daemon = start_daemon(base, root, **ENGINE_IN_TEST_PROCESS)
    try:
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=120) as client:
            replies = [client.chat([{"role": "user", "content": r["instruction"]}], adapter_id, max_new_tokens=60)
                       for r in records]
    finally:
        daemon.stop()
    for record, reply in zip(records, replies, strict=True):
        _, response = chat_texts(Record(record["instruction"], "", record["output"]), tok)
        want = tok.decode(tok(response, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        assert reply.text == want and reply.text.strip() == record["output"], record["instruction"]


@pytest.mark.slow  # a training run and a daemon, each in its own process (~25 s on 2 cores)
def test_a_chat_run_on_the_tiny_model_memorizes_the_demo_data(chat_base, make_config, subprocess_env, tmp_path,
                                                              gitclone_data):
    root = tmp_path / "root"
    cfg = make_config(base=str(chat_base), prompt_format="chat", lora_r=16, lora_target_modules=ALL_LINEAR,
                      max_steps=60, save_steps=1000, export_adapter=str(root / "trained"))
    _train_and_chat(chat_base, train_argv(cfg), root, "trained", subprocess_env, gitclone_data)


def readme_train_command() -> list[str]:
    """The README's ChatGLM3 training command (its ``\\`` continuations joined)."""
    block = README.read_text().split("<!-- chatglm3-train -->")[1].split("<!-- /chatglm3-train -->")[0]
    command = block.split("adapterd train ", 1)[1].split("\nadapterd ", 1)[0]
    return ["train", *shlex.split(command.replace("\\\n", " "))]


@pytest.mark.slow  # a P-Tuning v2 run and a daemon on the converted tiny ChatGLM3 (~45 s on 2 cores)
def test_the_readme_chat_run_on_a_converted_chatglm3_memorizes_the_demo_data(chatglm3, subprocess_env,  # noqa: F811
                                                                             tmp_path, gitclone_data):
    """The README's command as written (paths replaced), plus settings that make the tiny model learn fast."""
    paths = {"/models/chatglm3-6b-glm": str(chatglm3.dst), "alpaca.json": str(gitclone_data),
             "runs/glm-pt": str(tmp_path / "run"), "/srv/adapters": str(tmp_path / "root")}
    argv = [paths.get(arg, arg) for arg in readme_train_command()]
    argv = [arg.replace("/srv/adapters", paths["/srv/adapters"]) for arg in argv]
    assert argv[argv.index("--prompt-format") + 1] == "chat"
    fast = ["--quantization", "none", "--max-steps", "250", "--learning-rate", "3e-2", "--num-virtual-tokens",
            "16", "--batch-size", "3", "--eval-split", "0", "--save-steps", "1000", "--no-progress"]
    _train_and_chat(chatglm3.dst, [*CLI, *argv, *fast], tmp_path / "root", "glm-pt", subprocess_env,
                    gitclone_data)
