"""The command line, as a user runs it: tiny-model, serve (in its own process), generate, adapters, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from adapterd.clients import AdapterdClient
from tests.helpers import CLI, ENV, one_line_error


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    out = subprocess.run([*CLI, "tiny-model", str(tmp_path / "m")], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama"
    text = "你是谁？Who are you?"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def _serve(tiny_model_dir, adapter_root) -> Iterator[tuple[subprocess.Popen, str]]:
    """``adapterd serve`` in its own process, ready; killed afterwards if still running."""
    proc = subprocess.Popen([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root),
                             "--quantization", "none", "--port", "0", "--grace", "20"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+):(\d+)", line)
    assert match, line
    target = f"127.0.0.1:{match[2]}"
    with AdapterdClient(target) as c:
        c.wait_ready(60)
    yield proc, target
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapter_root):
    """One daemon process for the tests that only send it requests: each start imports torch twice (the daemon
    and its engine core) and loads the model, ~15 s on the 2-core machine."""
    yield from _serve(tiny_model_dir, adapter_root)


def test_generate_and_adapters_commands_against_a_served_daemon(served, tiny_model_dir, adapter_root):
    proc, target = served
    gen = subprocess.run([*CLI, "generate", "--target", target, "--adapter", "lora-qv", "--prompt", "hello world",
                          "--max-new-tokens", "6"], env=ENV, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    raw = subprocess.run([*CLI, "generate", "--target", target, "--adapter", "lora-qv", "--prompt", "hello world",
                          "--max-new-tokens", "6", "--raw", "--no-stream"], env=ENV, capture_output=True, text=True,
                         timeout=60)
    with AdapterdClient(target) as c:
        # The prompt goes as a user message in the adapter's template; --raw sends it as it is.
        chat = c.chat([{"role": "user", "content": "hello world"}], "lora-qv", max_new_tokens=6).text
        assert gen.stdout.rstrip("\n") == chat
        assert raw.stdout.rstrip("\n") == c.generate("hello world", "lora-qv", max_new_tokens=6).text != chat
    assert "6 tokens" in gen.stderr
    listing = subprocess.run([*CLI, "adapters", "--target", target], env=ENV, capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0 and "team/lora-all" in listing.stdout and "PREFIX_TUNING" in listing.stdout
    missing = subprocess.run([*CLI, "generate", "--target", target, "--adapter", "nope", "--prompt", "hi"],
                             env=ENV, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


# SIGTERM with requests in flight that finish: tests/server/core/test_engine_process.py
# (test_sigterm_drains_across_the_processes_and_exits_0), an `adapterd serve` process too.


@pytest.mark.slow  # ~10 s: a daemon process started, then stopped with something stuck
def test_sigterm_exits_within_the_grace_period_whatever_is_stuck(tiny_model_dir, adapter_root, tmp_path):
    """A request reading a FIFO named adapter_config.json (a worker thread that can never finish), a listing
    reading it too, and a stream of many tokens: SIGTERM with --grace 1 still ends the process in seconds."""
    import shutil
    import threading

    import grpc

    root = tmp_path / "adapters"
    shutil.copytree(adapter_root, root)
    (root / "stuck").mkdir()
    os.mkfifo(root / "stuck" / "adapter_config.json")
    os.mkfifo(root / "stuck" / "adapter_model.safetensors")
    proc = subprocess.Popen([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(root),
                             "--quantization", "none", "--port", "0", "--grace", "1"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on (\S+):(\d+)", proc.stdout.readline())
        assert match
        target = f"127.0.0.1:{match[2]}"
        with AdapterdClient(target) as c:
            c.wait_ready(60)
        codes: list[grpc.StatusCode] = []

        def call(fn):
            with AdapterdClient(target, timeout=60) as c:
                try:
                    result = fn(c)
                    list(result) if hasattr(result, "__next__") else None
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        calls = [lambda c: c.generate("hello", "stuck", max_new_tokens=4), lambda c: c.list_adapters(),
                 lambda c: c.generate_stream("hello", max_new_tokens=1000, min_new_tokens=1000)]
        threads = [threading.Thread(target=call, args=(fn,)) for fn in calls]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all three are in flight (or stuck)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        returncode = proc.wait(1 + 10)  # --grace, and a few seconds to stop the engine and leave
        assert time.monotonic() - started < 1 + 8
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stderr.read()
    assert returncode == 0, log[-3000:]
    assert "shutting down" in log and "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------------------- operator errors, pipes, flags


@pytest.mark.parametrize("flags,named", [
    (["--quantization", "int4"], "--quantization"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--gil-switch-interval-ms", "fast"], "--gil-switch-interval-ms"),
    (["--port", "65536"], "--port"),
    (["--log-level", "loud"], "--log-level"),
    (["--tls-cert", "server.crt"], "--tls-key"),
    (["--default-max-new-tokens", "2000"], "--default-max-new-tokens"),
    (["--device", "cpu,,cpu"], "--device"),  # one engine core per entry: an empty one is a typo
    (["--device", "cpu,cpu", "--no-engine-process"], "--device"),  # several cores are several processes
])
def test_serve_usage_errors_are_one_line_naming_the_flag(tiny_model_dir, adapter_root, flags, named):
    out = subprocess.run([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root), *flags],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert len(out.stderr.splitlines()) == 1  # before any log line: nothing else is said
    one_line_error(out, named)


@pytest.mark.parametrize("flags,named", [
    (["--truncate-input-tokens", "-1"], "--truncate-input-tokens"),  # an unsigned field of the request
    (["--max-new-tokens", "many"], "--max-new-tokens"),
    (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem"),
    (["--tls-cert", "me.crt"], "--tls-key"),
])
def test_generate_usage_errors_are_one_line_naming_the_flag(flags, named):
    out = subprocess.run([*CLI, "generate", "--prompt", "hi", "--target", "127.0.0.1:9", *flags], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert len(out.stderr.splitlines()) == 1
    one_line_error(out, named)


def test_serve_refuses_a_missing_adapter_root_naming_the_flag(tiny_model_dir, tmp_path):
    out = subprocess.run([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(tmp_path / "none")],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert "is not a directory" in one_line_error(out, "--adapters")


def _serve_fails(tiny_model_dir, adapter_root, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "serve", "--base", str(tiny_model_dir), "--adapters", str(adapter_root),
                           "--quantization", "none", "--port", "0", *flags],
                          env=ENV, capture_output=True, text=True, timeout=120)


def test_serve_refuses_a_busy_metrics_port_naming_it(tiny_model_dir, adapter_root):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = _serve_fails(tiny_model_dir, adapter_root, "--metrics-port", port)
    assert "Address already in use" in one_line_error(out, f"--metrics-port {port}")


def test_serve_refuses_a_certificate_that_does_not_match_its_key(tiny_model_dir, adapter_root, tmp_path):
    from tests.server.test_security import _make_pki

    pki = _make_pki(tmp_path)
    out = _serve_fails(tiny_model_dir, adapter_root, "--tls-cert", str(pki["server.crt"]),
                       "--tls-key", str(pki["client.key"]))
    line = one_line_error(out, f"--tls-key {pki['client.key']}")
    assert "does not match" in line and str(pki["server.crt"]) in line


def test_serve_refuses_an_address_it_cannot_listen_on_naming_it(tiny_model_dir, adapter_root):
    out = _serve_fails(tiny_model_dir, adapter_root, "--host", "192.0.2.1")  # TEST-NET-1: no machine's own
    assert "cannot listen there" in one_line_error(out, "--host 192.0.2.1 --port 0")


@pytest.mark.parametrize("command", [["adapters", "list"], ["generate", "--prompt", "hello", "--max-new-tokens", "4"]])
def test_output_into_a_closed_pipe_ends_quietly(served, command):
    """``adapterd adapters list | head -2``: the reader leaves early; the command ends as Unix tools do."""
    _, target = served
    proc = subprocess.Popen([*CLI, *command, "--target", target], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    assert proc.wait(60) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == ""


def test_generate_truncate_input_tokens(served):
    """The too-long prompt's error suggests truncate_input_tokens: the command line can set it."""
    _, target = served
    prompt = "hello world " * 300  # more tokens than the tiny model's context
    argv = [*CLI, "generate", "--target", target, "--prompt", prompt, "--max-new-tokens", "4", "--no-stream"]
    refused = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "truncate" in refused.stderr
    kept = subprocess.run([*argv, "--truncate-input-tokens", "16"], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert kept.returncode == 0, kept.stderr
    with AdapterdClient(target) as c:
        expected = c.chat([{"role": "user", "content": prompt}], max_new_tokens=4, truncate_input_tokens=16).text
    assert kept.stdout == expected + "\n"


def test_chat_keeps_the_conversation(served):
    """``adapterd chat``: each line a user message with the conversation so far; /reset starts again."""
    _, target = served
    lines = "你是谁？\nhello\n/reset\nhello\n"
    out = subprocess.run([*CLI, "chat", "--target", target, "--adapter", "lora-qv", "--system", "Be brief.",
                          "--max-new-tokens", "5"], input=lines, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    system = {"role": "system", "content": "Be brief."}
    with AdapterdClient(target) as c:
        first = c.chat([system, {"role": "user", "content": "你是谁？"}], "lora-qv", max_new_tokens=5).text
        second = c.chat([system, {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "hello"}], "lora-qv", max_new_tokens=5).text
        fresh = c.chat([system, {"role": "user", "content": "hello"}], "lora-qv", max_new_tokens=5).text
    assert answers == [first, second, fresh]
    assert out.stderr.count("5 tokens") + out.stderr.count("end of text") == 3


def test_help_is_fast_and_imports_no_torch():
    """``--help`` answers at once: the command modules import torch only when they run."""
    for command in ("serve", "merge", "generate", "chat", "adapters", "train"):
        code = ("import sys, contextlib, io; from adapterd.cli import main\n"
                "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                f"    main(['{command}', '--help'])\n"
                "assert 'torch' not in sys.modules, 'torch imported'")
        out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{command}: {out.stderr[-2000:]}"


@pytest.mark.parametrize("command", ["serve", "generate", "chat", "adapters", "health", "train", "merge",
                                     "tiny-model", "demo"])
def test_every_option_has_help_showing_its_default(command):
    import importlib

    from adapterd.cli import COMMANDS, Parser

    parser = Parser(prog=f"adapterd {command}")
    importlib.import_module(COMMANDS[command], "adapterd.cli").add_arguments(parser)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        text = " ".join(formatter.format_help().split())
        flag = action.option_strings[-1]
        assert len(text) > len(" ".join(action.option_strings)) + 12, f"{flag} has no help: {text}"
        has_default = not (action.default is None or action.default is False or action.default in ("", []))
        assert not has_default or "default" in text, f"{flag} hides its default {action.default!r}: {text}"
