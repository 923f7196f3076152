"""The daemon serves a converted ChatGLM3 base with converted P-Tuning v2 and LoRA adapters mixed in one batch:
each request's greedy answer equals the reference ChatGLM3 forward's for it alone (raw prompts and ChatGLM3's
chat format), and ModelInfo / ListAdapters report the GLM family and the adapters' kinds."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from adapterd.clients import AdapterdClient
from adapterd.server.convert.chatglm3_adapter import convert_chatglm3_adapter
from adapterd.v1 import adapterd_pb2 as pb
from tests.server.conftest import start_daemon
from tests.server.convert.chatglm3_fixture import reference_greedy, write_lora_checkpoint, write_prefix_checkpoint
from tests.server.convert.test_chatglm3_adapter import prefix_table

N = 10
PROMPTS = ["hello world", "你是谁？", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def served(chatglm3, tmp_path_factory):
    """The adapter root: a converted prefix-only P-Tuning v2 checkpoint and a converted query_key_value LoRA."""
    work = tmp_path_factory.mktemp("chatglm3-served")
    root = work / "adapters"
    table = prefix_table(chatglm3.tiny, 6, seed=11)
    convert_chatglm3_adapter(write_prefix_checkpoint(work / "pt", chatglm3.tiny, table), root / "ptuning",
                             chatglm3.dst)
    lora_src, deltas = write_lora_checkpoint(work / "lora-src", chatglm3.tiny, r=8, alpha=32, seed=12)
    convert_chatglm3_adapter(lora_src, root / "lora", chatglm3.dst)
    return root, {"": {}, "ptuning": {"prefix": table}, "lora": {"qkv_delta": deltas}}


def _stop_ids(chatglm3) -> set[int]:
    return set(json.loads((chatglm3.dst / "config.json").read_text())["eos_token_id"])


def _mixed_replies(daemon, jobs, **request):
    barrier = threading.Barrier(len(jobs))

    def call(job):
        text, adapter_id = job
        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=120) as c:
            barrier.wait()
            if request.get("chat"):
                return c.chat([{"role": "user", "content": text}], adapter_id, max_new_tokens=N)
            return c.generate(text, adapter_id, max_new_tokens=N)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(call, jobs))


@pytest.mark.slow  # a daemon, two adapters, the reference forward for every request (~10 s on 2 cores)
def test_mixed_batch_matches_chatglm3_alone(chatglm3, served):
    from adapterd.server.engine.observer import EngineObserver

    root, adapters = served
    d = start_daemon(chatglm3.dst, root, engine_process=False)  # in-process: the observer sees the batches
    kinds_per_step = []

    class Watch(EngineObserver):
        def decode_step(self, rows, seconds):
            kinds_per_step.append({r.adapter.type if r.adapter else "BASE" for r in rows})

    d.daemon.state.runtime.engine.observers.add(Watch())
    jobs = [(p, a) for p in PROMPTS for a in adapters]
    try:
        raw = _mixed_replies(d, jobs)
        chat = _mixed_replies(d, jobs, chat=True)
    finally:
        d.stop()
    assert any(kinds == {"BASE", "LORA", "PREFIX_TUNING"} for kinds in kinds_per_step)
    tok = AutoTokenizer.from_pretrained(chatglm3.dst)
    stop = _stop_ids(chatglm3)
    answers = set()
    for replies, render in ((raw, lambda p: tok(p).input_ids),
                            (chat, lambda p: tok(tok.apply_chat_template([{"role": "user", "content": p}],
                                                                         tokenize=False, add_generation_prompt=True),
                                                 add_special_tokens=False).input_ids)):
        for (prompt, adapter_id), reply in zip(jobs, replies, strict=True):
            ref = reference_greedy(chatglm3.weights, chatglm3.tiny, render(prompt), N, stop, **adapters[adapter_id])
            assert reply.text == tok.decode(ref, skip_special_tokens=True), (prompt, adapter_id)
            assert reply.generated_token_count == len(ref), (prompt, adapter_id)
            answers.add((prompt, adapter_id, tuple(ref)))
    # each adapter changes the answers, so a row served with another row's adapter could not pass
    assert len({tuple(ref for p, a, ref in answers if a == adapter) for adapter in adapters}) == len(adapters)


def test_model_info_and_listing_report_the_family(chatglm3, served):
    root, _ = served
    d = start_daemon(chatglm3.dst, root)
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=60) as c:
            info = c.model_info()
            listed = {a.adapter_id: a for a in c.list_adapters()}
    finally:
        d.stop()
    assert info.model_type == "glm"
    assert listed["ptuning"].type == pb.PREFIX_TUNING and listed["ptuning"].num_virtual_tokens == 6
    assert listed["lora"].type == pb.LORA and listed["lora"].rank == 8
    assert sorted(listed["lora"].target_modules) == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.slow  # an int8 daemon and PEFT's int8 answers for every request (~15 s on 2 cores)
def test_int8_mixed_batch_matches_peft_alone(chatglm3, served):
    """On the int8 base the oracle is PEFT on the same int8 base (int8 rounds differently from fp32)."""
    from tests.helpers import reference_greedy as peft_greedy

    root, adapters = served
    d = start_daemon(chatglm3.dst, root, quantization="int8")
    jobs = [(p, a) for p in PROMPTS[:2] for a in adapters]
    try:
        replies = _mixed_replies(d, jobs)
    finally:
        d.stop()
    tok = AutoTokenizer.from_pretrained(chatglm3.dst)
    for (prompt, adapter_id), reply in zip(jobs, replies, strict=True):
        want = peft_greedy(chatglm3.dst, prompt, root / adapter_id if adapter_id else None, N, "int8")
        want = want[: min((want.index(s) for s in _stop_ids(chatglm3) if s in want), default=len(want))]
        assert reply.text == tok.decode(want, skip_special_tokens=True), (prompt, adapter_id)
