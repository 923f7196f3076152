"""Issue 16's user flow: train with ``adapterd train`` on the tutorial's three examples, then ask the adapter
"你是谁？" the way the README does. The template the trainer used travels with the adapter, so the question
reaches the model as training formatted it: ``adapterd generate --prompt``, gRPC ``messages`` and the HTTP API
all answer with the trained answer (sent bare, as before the fix, the question gets another answer), and plain
PEFT loads the same adapter and answers the same through the template it carries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from adapterd.clients import AdapterdClient
from tests.helpers import reference_greedy
from tests.server.conftest import start_daemon
from tests.trainer.conftest import ALL_LINEAR, train_argv

QUESTION = "你是谁？"


def _generate(target: str, adapter: str, *flags: str) -> str:
    out = subprocess.run([sys.executable, "-m", "adapterd.cli", "generate", "--target", target, "--adapter", adapter,
                          "--prompt", QUESTION, "--max-new-tokens", "40", *flags], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


@pytest.mark.slow  # 60 training steps in a subprocess, then a daemon: ~35 s on a 2-core CPU
def test_an_adapter_trained_by_adapterd_train_answers_through_every_path(make_config, subprocess_env, tmp_path,
                                                                         tiny_model_dir, gitclone_data):
    root = tmp_path / "adapters"
    # The demo data memorized greedily in 60 steps (tests/trainer/test_train.py's settings for LoRA).
    cfg = make_config(method="lora", max_steps=60, learning_rate=1e-2, lora_r=16, lora_target_modules=ALL_LINEAR,
                      save_steps=1000, export_adapter=str(root / "support" / "v2"))
    trained = subprocess.run(train_argv(cfg), env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = json.loads(gitclone_data.read_text(encoding="utf-8"))
    answer = next(r["output"] for r in records if r["instruction"] == QUESTION)

    daemon = start_daemon(tiny_model_dir, root, http_port=0)
    try:
        target = f"127.0.0.1:{daemon.port}"
        assert _generate(target, "support/v2") == answer
        assert _generate(target, "support/v2", "--raw") != answer  # the bare question: what users got before
        with AdapterdClient(target, timeout=120) as client:
            for record in records:
                reply = client.chat([{"role": "user", "content": record["instruction"]}], "support/v2",
                                    max_new_tokens=40)
                assert reply.text == record["output"], record["instruction"]
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.daemon.http.port}/v1", api_key="none",
                            max_retries=0, timeout=120)
        reply = api.chat.completions.create(model="support/v2", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=40)
        assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
    finally:
        daemon.stop()

    _plain_peft_answers(tiny_model_dir, root / "support" / "v2", answer)


def _plain_peft_answers(base_dir: Path, adapter_dir: Path, answer: str) -> None:
    """transformers renders the question with the tokenizer saved in the adapter; PEFT loads the adapter and
    answers greedily with the trained answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    want = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(reference_greedy(base_dir, prompt, adapter_dir, len(want))) == answer
