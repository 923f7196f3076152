"""MergeAdapter and the training RPCs, end to end through the daemon."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterd.clients import AdapterdClient
from adapterd.v1 import adapterd_pb2 as pb
from tests.helpers import TEST_DEVICE, make_lora_adapter, reference_greedy
from tests.server.conftest import start_daemon
from tests.server.metrics.conftest import free_port, samples, scrape, value


@pytest.fixture(scope="module")
def ops_daemon(tiny_model_dir, served_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("ops")
    make_lora_adapter(tiny_model_dir, served_root / "lora-qv-b", r=8, alpha=16, targets=["q_proj", "v_proj"], seed=11)
    metrics_port = free_port()
    d = start_daemon(tiny_model_dir, served_root, runs=work / "runs", merge_output_root=work / "merged",
                     metrics_port=metrics_port)
    d.work, d.metrics_port = work, metrics_port
    yield d
    d.stop()


@pytest.fixture()
def ops_client(ops_daemon):
    with AdapterdClient(f"127.0.0.1:{ops_daemon.port}", timeout=300) as c:
        yield c


@torch.no_grad()
def plain_greedy(model_dir, prompt: str, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(TEST_DEVICE).eval()
    ids = tok(prompt, return_tensors="pt").input_ids.to(TEST_DEVICE)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_merge_into_weights_gives_the_daemons_tokens(ops_client, ops_daemon, tiny_model_dir):
    messages = list(ops_client.merge(pb.MergeAdapterRequest(
        adapters=[pb.WeightedAdapter(adapter_id="team/lora-all")], output_model_dir="all-merged")))
    assert messages[-1].done and messages[-1].output.endswith("all-merged")
    done = [m.tensors_done for m in messages]
    assert done == sorted(done) and messages[-1].tensors_done == messages[-1].tensors_total > 0
    merged_dir = ops_daemon.work / "merged" / "all-merged"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt in ("hello world", "你是谁？"):
        served = ops_client.generate(prompt, "team/lora-all", max_new_tokens=10)
        plain = plain_greedy(merged_dir, prompt, 10)
        eos = tok.eos_token_id
        plain = plain[: plain.index(eos)] if eos in plain else plain
        assert served.text == tok.decode(plain, skip_special_tokens=True), prompt
    # an existing output is not replaced unless asked
    with pytest.raises(grpc.RpcError) as err:
        list(ops_client.merge(pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora-qv")],
                                                     output_model_dir="all-merged")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_merge_into_a_new_adapter_is_served_at_once(ops_client, served_root, tiny_model_dir):
    request = pb.MergeAdapterRequest(
        adapters=[pb.WeightedAdapter(adapter_id="lora-qv", weight=0.7),
                  pb.WeightedAdapter(adapter_id="lora-qv-b", weight=0.3)],
        output_adapter_id="mixes/ties", strategy=pb.TIES, density=0.5)
    last = list(ops_client.merge(request))[-1]
    assert last.done and last.output == "mixes/ties"
    reply = ops_client.generate("hello world", "mixes/ties", max_new_tokens=8)
    ref = reference_greedy(tiny_model_dir, "hello world", served_root / "mixes" / "ties", 8)
    assert reply.text == AutoTokenizer.from_pretrained(tiny_model_dir).decode(ref, skip_special_tokens=True)
    # overwriting the id serves the new weights, not the old copy
    request.overwrite, request.strategy = True, pb.LINEAR
    list(ops_client.merge(request))
    ref2 = reference_greedy(tiny_model_dir, "hello world", served_root / "mixes" / "ties", 8)
    reply2 = ops_client.generate("hello world", "mixes/ties", max_new_tokens=8)
    assert reply2.text == AutoTokenizer.from_pretrained(tiny_model_dir).decode(ref2, skip_special_tokens=True)


@pytest.mark.parametrize("request_kwargs, code, field", [
    ({"adapters": [pb.WeightedAdapter(adapter_id="prefix")], "output_model_dir": "p"},
     grpc.StatusCode.FAILED_PRECONDITION, "cannot be folded"),
    ({"adapters": [pb.WeightedAdapter(adapter_id="lora-qv"), pb.WeightedAdapter(adapter_id="team/lora-all")],
      "output_adapter_id": "bad", "strategy": pb.LINEAR}, grpc.StatusCode.FAILED_PRECONDITION, "rank"),
    ({"adapters": [pb.WeightedAdapter(adapter_id="../x")], "output_model_dir": "x"},
     grpc.StatusCode.INVALID_ARGUMENT, "adapters[0].adapter_id"),
    ({"adapters": [pb.WeightedAdapter(adapter_id="lora-qv")]}, grpc.StatusCode.INVALID_ARGUMENT, "output"),
    ({"adapters": [pb.WeightedAdapter(adapter_id="lora-qv")], "output_model_dir": "/etc/evil"},
     grpc.StatusCode.INVALID_ARGUMENT, "output_model_dir"),
])
def test_merge_refusals(ops_client, request_kwargs, code, field):
    with pytest.raises(grpc.RpcError) as err:
        list(ops_client.merge(pb.MergeAdapterRequest(**request_kwargs)))
    assert err.value.code() == code and field in err.value.details()
    assert ops_client.generate("hi", max_new_tokens=2).generated_token_count == 2


def test_training_rpcs_end_to_end(ops_client, ops_daemon, tiny_model_dir):
    """StartTraining launches a run as its own process; WatchTraining follows it to the end; the exported
    adapter, served by the daemon, answers the tutorial's question with its trained answer."""
    from adapterd.cli.demo import DATA
    from adapterd.trainer.data import format_prompt

    run = ops_client.start_training(pb.StartTrainingRequest(
        data_path=str(DATA), method="lora", run_id="rpc-lora",
        export_adapter_id="trained/rpc-lora",
        options={"quantization": "none", "max_steps": "60", "learning_rate": "1e-2", "lora_r": "16",
                 "lora_target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                 "batch_size": "3", "eval_split": "0", "lora_dropout": "0", "save_steps": "30"}))
    assert run.run_id == "rpc-lora" and run.state in (pb.PENDING, pb.RUNNING)
    states, steps = set(), []
    for update in ops_client.watch_training("rpc-lora"):
        (r,) = update.runs
        states.add(r.state)
        steps.append(r.step)
        if r.state in (pb.COMPLETED, pb.FAILED, pb.STOPPED):
            break
    (final,) = ops_client.train_status("rpc-lora")
    assert final.state == pb.COMPLETED, final.error
    assert final.step == final.total_steps == 60 and final.loss < 0.5 and final.last_checkpoint
    assert final.exported_to.endswith("trained/rpc-lora") and final.final_adapter and not final.HasField("eval_loss")
    assert steps == sorted(steps) and len(set(steps)) > 2
    assert "rpc-lora" in {r.run_id for r in ops_client.train_status()}
    answer = ops_client.generate(format_prompt("你是谁？"), "trained/rpc-lora", max_new_tokens=40)
    assert answer.text == "我是Gitclone，一个语言模型，由来自git-cloner的研究人员训练。"
    with pytest.raises(grpc.RpcError) as err:
        ops_client.train_status("no-such-run")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_training_ends_a_run_with_a_checkpoint(ops_client):
    from adapterd.cli.demo import DATA

    ops_client.start_training(pb.StartTrainingRequest(
        data_path=str(DATA), method="ptuning-v2", run_id="rpc-stop",
        options={"quantization": "none", "max_steps": "100000", "num_virtual_tokens": "8", "batch_size": "3",
                 "eval_split": "0", "save_steps": "100000"}))
    for update in ops_client.watch_training("rpc-stop"):
        if update.runs[0].step >= 3:
            break
    ops_client.stop_training("rpc-stop")
    for update in ops_client.watch_training("rpc-stop"):
        if update.runs[0].state in (pb.STOPPED, pb.FAILED, pb.COMPLETED):
            break
    (run,) = ops_client.train_status("rpc-stop")
    assert run.state == pb.STOPPED and run.last_checkpoint and run.step < 100000


def test_a_killed_trainer_is_failed_in_the_next_scrape_and_in_train_status(ops_client, ops_daemon):
    """kill -9 of a trainer writes nothing: the first scrape after it, before anyone calls TrainStatus, and
    TrainStatus both say failed (the collector and the RPC judge the run by the same rule)."""
    import json
    import os
    import signal
    import time

    from adapterd.cli.demo import DATA
    from adapterd.trainer.runlock import lock_held, process_alive

    ops_client.start_training(pb.StartTrainingRequest(
        data_path=str(DATA), method="lora", run_id="rpc-killed",
        options={"quantization": "none", "max_steps": "100000", "batch_size": "3", "eval_split": "0",
                 "save_steps": "100000"}))
    for update in ops_client.watch_training("rpc-killed"):
        if update.runs[0].step >= 1:
            break
    run_dir = ops_daemon.work / "runs" / "rpc-killed"
    status = json.loads((run_dir / "status.json").read_text())
    os.kill(status["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    # The leader thread turns zombie before the last thread lets go of the process's files (and its lock).
    while (process_alive(status["pid"]) or lock_held(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    parsed = samples(scrape(ops_daemon.metrics_port))
    assert value(parsed, "adapterd_training_state", run_id="rpc-killed", state="failed") == 1
    assert value(parsed, "adapterd_training_state", run_id="rpc-killed", state="running") == 0
    (run,) = ops_client.train_status("rpc-killed")
    assert run.state == pb.FAILED and "was killed" in run.error and run.step >= 1


def test_a_client_that_leaves_mid_merge_stops_it_and_nothing_is_left(tmp_path_factory):
    """The merge runs in its own process; cancelling the call stops that process, which removes its
    temporary output: no model directory and no hidden temporary one."""
    import time

    from adapterd.common.tiny_model import build_tokenizer
    from adapterd.server.merge.synthetic import LlamaShape, write_random_llama, write_random_lora

    work = tmp_path_factory.mktemp("cancel-merge")
    shape = LlamaShape(vocab_size=2000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=12,
                       num_attention_heads=16, num_key_value_heads=16)
    write_random_llama(work / "base", shape, dtype=torch.bfloat16)
    build_tokenizer(256).save_pretrained(work / "base")
    write_random_lora(work / "adapters" / "big", shape, r=16)
    d = start_daemon(work / "base", work / "adapters", merge_output_root=work / "out")
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=300) as c:
            call = c.merge(pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="big")],
                                                  output_model_dir="merged"))
            first = next(call)
            assert not first.done and first.tensors_done < first.tensors_total
            call.cancel()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (work / "out").exists() and any((work / "out").iterdir()):
                time.sleep(0.1)
            assert not (work / "out").exists() or not any((work / "out").iterdir())
            assert c.generate("hello", max_new_tokens=2).generated_token_count == 2
    finally:
        d.stop()


@pytest.mark.parametrize("option, text", [("lora_alpha", "nan"), ("weight_decay", "inf"), ("epochs", "inf"),
                                          ("learning_rate", "-nan")])
def test_training_options_must_be_finite(ops_client, option, text):
    """Issue 12: a NaN lora_alpha (or an infinite weight decay) trained and exported an adapter whose weights
    poisoned every batch it joined; now StartTraining refuses it, naming the option, and starts nothing."""
    from adapterd.cli.demo import DATA

    with pytest.raises(grpc.RpcError) as err:
        ops_client.start_training(pb.StartTrainingRequest(
            data_path=str(DATA), method="lora", run_id=f"bad-{option}", options={option: text}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"options[{option}]" in err.value.details() and "finite" in err.value.details()
    assert f"bad-{option}" not in {r.run_id for r in ops_client.train_status()}
