"""Admission over gRPC: a base request is not held behind a LoRA request waiting for a slot (issue 14)."""

from __future__ import annotations

import threading
import time

from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from tests.helpers import reference_greedy
from tests.server.conftest import start_daemon


def _engine_adapters(daemon) -> tuple[list[str], list[str]]:
    """The adapter ids of the running rows and of the waiting requests, read on the engine thread."""
    engine = daemon.daemon.state.runtime.engine

    def ids(rows) -> list[str]:
        return [r.adapter.adapter_id if r.adapter else "" for r in rows]

    return engine.call(lambda: (ids(engine.batch.rows), ids(engine.waiting))).result(10)


def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_base_request_is_served_while_a_lora_request_waits_for_the_slot(tiny_model_dir, served_root):
    long_new, short_new = 300, 8
    jobs = {"long": ("hello world", "lora-qv", long_new), "waits": ("你是谁？", "lora-rs", short_new),
            "base": ("hi there", "", short_new)}
    refs = {name: reference_greedy(tiny_model_dir, p, served_root / a if a else None, n)
            for name, (p, a, n) in jobs.items()}
    assert len(refs["long"]) == long_new  # no EOS: the long request holds the one slot for 300 steps
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    d = start_daemon(tiny_model_dir, served_root, lora_slots=1, max_batch_size=4, engine_process=False)
    messages: dict[str, list] = {"long": [], "waits": []}
    started = {name: threading.Event() for name in messages}  # its first message came: it was admitted

    def stream(name: str) -> None:
        prompt, adapter_id, new_tokens = jobs[name]
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=120) as c:
            for message in c.generate_stream(prompt, adapter_id, max_new_tokens=new_tokens):
                messages[name].append(message)
                started[name].set()

    threads = {name: threading.Thread(target=stream, args=(name,)) for name in messages}
    try:
        threads["long"].start()
        assert started["long"].wait(60)  # admitted: it holds the slot
        threads["waits"].start()
        _until(lambda: _engine_adapters(d)[1] == ["lora-rs"])
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=120) as c:
            base = c.generate(*jobs["base"][:2], max_new_tokens=short_new)
        # The base request is done; the long request still runs and the second LoRA request still waits.
        assert not started["waits"].is_set()
        assert _engine_adapters(d) == (["lora-qv"], ["lora-rs"])
        for thread in threads.values():
            thread.join(120)
    finally:
        d.stop()
    assert base.text == tok.decode(refs["base"], skip_special_tokens=True)
    for name, replies in messages.items():
        assert "".join(m.text for m in replies) == tok.decode(refs[name], skip_special_tokens=True), name
        assert replies[-1].generated_token_count == len(refs[name])
