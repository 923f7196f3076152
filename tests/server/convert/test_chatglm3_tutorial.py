"""The README's "From the ChatGLM3 tutorial" commands, run as written through the real command line on a tiny
ChatGLM3 and a finetune_demo P-Tuning v2 checkpoint (paths replaced; the daemon on the CPU, a free port and a
short answer added): the answer equals the reference ChatGLM3 forward's for the question in ChatGLM3's chat
format with that prefix. And ``adapterd train`` trains LoRA and P-Tuning v2 on the converted base, each
adapter served as PEFT serves it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from adapterd.clients import AdapterdClient
from tests.helpers import CLI, ENV
from tests.helpers import reference_greedy as peft_greedy
from tests.server.conftest import ENGINE_IN_TEST_PROCESS, start_daemon
from tests.server.convert.chatglm3_fixture import reference_greedy, write_prefix_checkpoint
from tests.server.convert.test_chatglm3_adapter import prefix_table
from tests.server.convert.test_chatglm3_serve import _stop_ids

README = Path(__file__).parents[3] / "README.md"
NEW_TOKENS = 8


def documented_commands() -> list[list[str]]:
    block = README.read_text().split("<!-- chatglm3-tutorial -->")[1].split("<!-- /chatglm3-tutorial -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("adapterd ")]
    return [shlex.split(line.removesuffix("&")) for line in lines]


@pytest.mark.slow  # four command-line processes (each imports torch) and a daemon: ~30 s on 2 cores
def test_the_readme_commands_answer_as_chatglm3_with_its_prefix(chatglm3, tmp_path):
    table = prefix_table(chatglm3.tiny, 5, seed=21)
    checkpoint = write_prefix_checkpoint(tmp_path / "output" / "checkpoint-3000", chatglm3.tiny, table,
                                         chatglm3.weights, fmt="safetensors")  # a full finetune_demo checkpoint
    paths = {"/models/chatglm3-6b-glm": str(tmp_path / "glm"), "/models/chatglm3-6b": str(chatglm3.src),
             "output/checkpoint-3000": str(checkpoint), "/srv/adapters": str(tmp_path / "adapters")}
    commands = [[_replace(arg, paths) for arg in argv] for argv in documented_commands()]
    assert [c[:2] for c in commands] == [["adapterd", "convert"]] * 2 + [["adapterd", "serve"],
                                                                         ["adapterd", "generate"]]
    for argv in commands[:2]:
        done = subprocess.run([*CLI, *argv[1:]], env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("wrote ")
    serve = subprocess.Popen([*CLI, *commands[2][1:], "--quantization", "none", "--device", "cpu", "--port", "0"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r"listening on (\S+):(\d+)", serve.stdout.readline())[2]
        with AdapterdClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(120)
        asked = subprocess.run([*CLI, *commands[3][1:], "--target", f"127.0.0.1:{port}", "--max-new-tokens",
                                str(NEW_TOKENS)], env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        serve.kill()
        serve.wait()
    assert asked.returncode == 0, asked.stderr[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "glm")
    question = commands[3][commands[3].index("--prompt") + 1]
    ids = tok(f"[gMASK]sop<|user|>\n {question}<|assistant|>", add_special_tokens=False).input_ids
    want = reference_greedy(chatglm3.weights, chatglm3.tiny, ids, NEW_TOKENS, _stop_ids(chatglm3), prefix=table)
    assert asked.stdout.removesuffix("\n") == tok.decode(want, skip_special_tokens=True)


def _replace(arg: str, paths: dict[str, str]) -> str:
    for documented, real in paths.items():  # longest first: the converted base's path extends the source's
        arg = arg.replace(documented, real)
    return arg


@pytest.mark.slow  # two short training runs in their own processes, then a daemon: ~20 s on 2 cores
def test_adapterd_train_trains_lora_and_ptuning_v2_on_the_converted_base(chatglm3, tmp_path, gitclone_data):
    root = tmp_path / "adapters"
    runs = {}
    for method in ("lora", "ptuning-v2"):  # side by side: each is mostly its one-thread torch import
        argv = [*CLI, "train", "--base", str(chatglm3.dst), "--data", str(gitclone_data), "--method", method,
                "--quantization", "none", "--max-steps", "3", "--batch-size", "2", "--num-virtual-tokens", "4",
                "--learning-rate", "1e-2", "--output", str(tmp_path / method), "--export-adapter", str(root / method)]
        runs[method] = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for method, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{method}: {err[-3000:]}"
    d = start_daemon(chatglm3.dst, root, **ENGINE_IN_TEST_PROCESS)  # the adapters served, not the process boundary
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=120) as client:
            replies = {m: client.generate("hello world", m, max_new_tokens=NEW_TOKENS) for m in ("lora", "ptuning-v2")}
    finally:
        d.stop()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatglm3.dst)
    for method, reply in replies.items():
        want = peft_greedy(chatglm3.dst, "hello world", root / method, NEW_TOKENS)
        assert reply.text == tok.decode(want, skip_special_tokens=True), method
