"""Adapters over gRPC: listing, hot load and unload while others generate, and every refusal's code."""

from __future__ import annotations

import os
import shutil
import threading

import grpc
import pytest
from grpc_status import rpc_status
from transformers import AutoTokenizer

from adapterd.common.tiny_model import TinyModelConfig, build_tiny_model
from adapterd.v1 import adapterd_pb2 as pb
from tests.helpers import TEST_DEVICE, make_lora_adapter, make_prefix_adapter, reference_greedy


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code(), err.value.details()


def bad_field(fn, *args, **kwargs) -> str:
    """The field named in the error's google.rpc.BadRequest details."""
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    status = rpc_status.from_call(err.value)
    assert status is not None and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return detail.field_violations[0].field


def test_list_adapters_describes_each(client):
    client.generate("hi", "lora-qv", max_new_tokens=1)
    infos = {a.adapter_id: a for a in client.list_adapters()}
    assert {"lora-qv", "team/lora-all", "lora-rs", "prefix", "prefix-proj"} <= set(infos)
    qv = infos["lora-qv"]
    assert qv.type == pb.LORA and qv.rank == 8 and sorted(qv.target_modules) == ["q_proj", "v_proj"]
    resident = pb.RESIDENT_GPU if TEST_DEVICE.startswith("cuda") else pb.RESIDENT_CPU
    assert qv.state == resident and qv.last_used_unix > 0 and qv.size_bytes > 1000
    assert infos["prefix"].type == pb.PREFIX_TUNING and infos["prefix"].num_virtual_tokens == 6
    assert infos["lora-rs"].state in (pb.ON_DISK, pb.RESIDENT_CPU, pb.RESIDENT_GPU)


def test_bad_parameters_name_their_field(client):
    assert bad_field(client.generate, "hi", temperature=-1.0) == "sampling.temperature"
    assert bad_field(client.generate, "hi", top_p=1.5, temperature=1.0) == "sampling.top_p"
    assert bad_field(client.generate, "hi", max_new_tokens=10**6) == "stopping.max_new_tokens"
    assert bad_field(client.generate, "hi", max_new_tokens=4, min_new_tokens=5) == "stopping.min_new_tokens"
    assert bad_field(client.generate, "hi", stop_sequences=["a"] * 7) == "stopping.stop_sequences"
    assert bad_field(client.generate, "hi", stop_sequences=[""]) == "stopping.stop_sequences[0]"
    assert bad_field(client.generate, "") == "prompt"
    assert bad_field(client.generate, "hi", "../escape") == "adapter_id"
    assert bad_field(client.generate, "hi", "/etc") == "adapter_id"
    assert bad_field(client.load_adapter, "a/../../b") == "adapter_id"
    # the daemon keeps serving
    assert client.generate("hi", max_new_tokens=2).generated_token_count == 2


def test_unknown_adapter_is_not_found(client):
    code, details = code_of(client.generate, "hi", "no-such-adapter")
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in details
    assert code_of(client.load_adapter, "missing/one")[0] == grpc.StatusCode.NOT_FOUND


def test_symlink_out_of_the_root_is_refused(client, served_root, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "lora-qv", outside)
    os.symlink(outside, served_root / "escape")
    try:
        code, details = code_of(client.load_adapter, "escape")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details
        assert "escape" not in {a.adapter_id for a in client.list_adapters()}
    finally:
        os.unlink(served_root / "escape")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A base of another shape: adapters made for it do not fit the served base."""
    return build_tiny_model(tmp_path_factory.mktemp("other-base"),
                            TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3))


def test_adapters_for_another_base_fail_precondition(client, served_root, other_base):
    make_lora_adapter(other_base, served_root / "foreign-lora", r=4, targets=["q_proj"])
    make_prefix_adapter(other_base, served_root / "foreign-prefix", num_virtual_tokens=4)
    for adapter_id in ("foreign-lora", "foreign-prefix"):
        code, details = code_of(client.generate, "hi", adapter_id)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "base" in details
    infos = {a.adapter_id: a for a in client.list_adapters()}
    assert infos["foreign-lora"].state == pb.LOAD_FAILED and "shapes" in infos["foreign-lora"].error


def test_rank_above_the_limit_fails_precondition(tiny_model_dir, served_root):
    from adapterd.clients import AdapterdClient
    from tests.server.conftest import start_daemon

    d = start_daemon(tiny_model_dir, served_root, max_lora_rank=8)
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}") as c:
            code, details = code_of(c.load_adapter, "lora-rs")  # r=16
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "max" in details
            assert c.load_adapter("lora-qv").rank == 8
    finally:
        d.stop()


@pytest.mark.parametrize("damage", ["truncated", "garbage-config", "no-weights", "pickle-only"])
def test_damaged_adapter_files_get_clear_errors(client, served_root, adapter_root, damage):
    target = served_root / f"broken-{damage}"
    shutil.copytree(adapter_root / "lora-qv", target)
    weights = target / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage-config":
        (target / "adapter_config.json").write_bytes(os.urandom(64))
    elif damage == "no-weights":
        weights.unlink()
    else:
        weights.rename(target / "adapter_model.bin")
    code, details = code_of(client.generate, "hi", f"broken-{damage}")
    expected = grpc.StatusCode.FAILED_PRECONDITION if damage == "pickle-only" else grpc.StatusCode.DATA_LOSS
    assert code == expected, details
    assert client.generate("hi", "lora-qv", max_new_tokens=2).generated_token_count == 2


LONG = 400


def test_hot_load_and_unload_while_others_generate(client, daemon, served_root, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    results: dict[str, str] = {}

    def background(name, adapter_id):
        from adapterd.clients import AdapterdClient

        with AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=120) as c:
            results[name] = c.generate("Tell me a story", adapter_id, max_new_tokens=LONG, min_new_tokens=LONG).text

    threads = [threading.Thread(target=background, args=(f"t{i}", a)) for i, a in enumerate(["lora-qv", "prefix"])]
    for t in threads:
        t.start()
    from tests.server.test_generate_rpc import _running_rows

    # a brand-new adapter appears on disk and is served without a restart
    make_lora_adapter(tiny_model_dir, served_root / "fresh", r=2, alpha=4, targets=["k_proj", "down_proj"], seed=9)
    info = client.load_adapter("fresh")
    assert info.state in (pb.RESIDENT_CPU, pb.RESIDENT_GPU) and info.rank == 2
    fresh = client.generate("hello world", "fresh", max_new_tokens=8)
    assert fresh.text == tok.decode(reference_greedy(tiny_model_dir, "hello world", served_root / "fresh", 8),
                                    skip_special_tokens=True)
    assert client.unload_adapter("fresh").state == pb.ON_DISK
    assert _running_rows(daemon) == 2, "the long requests must still be running"
    assert client.unload_adapter("lora-qv").state == pb.ON_DISK  # in use by t0: its row keeps its weights
    for t in threads:
        t.join(120)
    for name, adapter_id in (("t0", "lora-qv"), ("t1", "prefix")):
        ref = reference_greedy(tiny_model_dir, "Tell me a story", served_root / adapter_id, LONG)
        assert results[name] == tok.decode(ref, skip_special_tokens=True)
    # used again after unloading: loaded again on first use
    assert client.generate("hi", "lora-qv", max_new_tokens=1).generated_token_count == 1


def test_slots_are_reused_least_recently_used_first(tiny_model_dir, served_root):
    """More adapters than device slots: each request still gets its own adapter's tokens."""
    from adapterd.clients import AdapterdClient
    from tests.server.conftest import start_daemon

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    d = start_daemon(tiny_model_dir, served_root, lora_slots=2, engine_process=False)  # slot counters
    try:
        with AdapterdClient(f"127.0.0.1:{d.port}") as c:
            for adapter_id in ["lora-qv", "team/lora-all", "lora-rs", "lora-qv", "lora-rs"]:
                reply = c.generate("hello world", adapter_id, max_new_tokens=6)
                ref = reference_greedy(tiny_model_dir, "hello world", served_root / adapter_id, 6)
                assert reply.text == tok.decode(ref, skip_special_tokens=True), adapter_id
        assert d.daemon.state.runtime.engine.runner.slots.evictions >= 2
    finally:
        d.stop()


# ---------------------------------------------------------------- issue 12: files of one tenant vs the daemon

EVIL_KEY = "(.|.)*(.|.)*(.|.)*Z"  # Python's re backtracks for ever on a module name (froze every RPC)


def rss_bytes() -> int:
    """Resident memory of this process, which is the daemon's too (it runs in a thread of the tests)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def serves_peft_tokens(client, tiny_model_dir, served_root, adapter_id="lora-qv") -> None:
    """The daemon still serves: another adapter gives PEFT's greedy tokens."""
    reply = client.generate("hello world", adapter_id, max_new_tokens=6)
    ref = reference_greedy(tiny_model_dir, "hello world", served_root / adapter_id, 6)
    assert reply.text == AutoTokenizer.from_pretrained(tiny_model_dir).decode(ref, skip_special_tokens=True)


def _copy_with_config(served_root, adapter_root, name, **changes) -> None:
    import json

    shutil.copytree(adapter_root / "lora-qv", served_root / name)
    config = json.loads((served_root / name / "adapter_config.json").read_text())
    config.update(changes)
    (served_root / name / "adapter_config.json").write_text(json.dumps(config))


def test_a_backtracking_alpha_pattern_does_not_freeze_the_daemon(client, served_root, adapter_root,
                                                                  tiny_model_dir):
    import time

    _copy_with_config(served_root, adapter_root, "evil-pattern", alpha_pattern={EVIL_KEY: 2})
    started = time.monotonic()
    reply = client.generate("hello world", "evil-pattern", max_new_tokens=6)
    assert time.monotonic() - started < 30
    # the key matches no module, so every module keeps lora_alpha: the tokens are lora-qv's, as PEFT's
    ref = reference_greedy(tiny_model_dir, "hello world", adapter_root / "lora-qv", 6)
    assert reply.text == AutoTokenizer.from_pretrained(tiny_model_dir).decode(ref, skip_special_tokens=True)
    serves_peft_tokens(client, tiny_model_dir, served_root, "team/lora-all")


def test_a_fifo_config_is_refused_and_listed_without_blocking(client, served_root, tiny_model_dir):
    (served_root / "fifo").mkdir()
    os.mkfifo(served_root / "fifo" / "adapter_config.json")
    try:
        infos = {a.adapter_id: a for a in client.list_adapters()}  # used to hang the event loop
        assert infos["fifo"].state == pb.LOAD_FAILED and "not a regular file" in infos["fifo"].error
        code, details = code_of(client.generate, "hi", "fifo")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not a regular file" in details
        serves_peft_tokens(client, tiny_model_dir, served_root)
    finally:
        shutil.rmtree(served_root / "fifo")


def test_huge_files_are_refused_unread_and_their_memory_is_not_kept(client, served_root, adapter_root,
                                                                    tiny_model_dir):
    import json
    import struct

    shutil.copytree(adapter_root / "lora-qv", served_root / "huge-config")
    with open(served_root / "huge-config" / "adapter_config.json", "r+b") as f:
        f.truncate(300 * 1024**2)  # sparse: the old reader took all 300 MB into memory, on the event loop
    (served_root / "sparse-weights").mkdir()
    shutil.copy(adapter_root / "lora-qv" / "adapter_config.json", served_root / "sparse-weights")
    header = json.dumps({"w": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(served_root / "sparse-weights" / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(2 * 1024**3)
    before = rss_bytes()
    try:
        for _ in range(3):
            code, details = code_of(client.generate, "hi", "huge-config")
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "larger than" in details, details
            code, details = code_of(client.generate, "hi", "sparse-weights")
            assert code == grpc.StatusCode.DATA_LOSS and "adapter_model.safetensors" in details, details
            assert str(served_root) not in details
        infos = {a.adapter_id: a for a in client.list_adapters()}
        assert infos["huge-config"].state == pb.LOAD_FAILED
        assert rss_bytes() - before < 64 * 1024**2
        serves_peft_tokens(client, tiny_model_dir, served_root)
    finally:
        shutil.rmtree(served_root / "huge-config")
        shutil.rmtree(served_root / "sparse-weights")


@pytest.mark.parametrize("name, config", [("rank-neg", {"r": -1}), ("rank-huge", {"r": 2**70}),
                                          ("deep", {"target_modules": None})])
def test_one_odd_config_does_not_break_listing(client, served_root, adapter_root, tiny_model_dir, name, config):
    _copy_with_config(served_root, adapter_root, name, **config)
    if name == "deep":  # nested past any limit: the JSON parser's recursion used to fail the whole listing
        (served_root / name / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '
                                                               + "[" * 50_000 + "]" * 50_000 + "}")
    try:
        infos = {a.adapter_id: a for a in client.list_adapters()}
        assert infos[name].state == pb.LOAD_FAILED and infos[name].error
        assert infos["lora-qv"].type == pb.LORA and infos["lora-qv"].rank == 8 and not infos["lora-qv"].error
        assert infos["prefix"].num_virtual_tokens == 6
        code, details = code_of(client.load_adapter, name)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        serves_peft_tokens(client, tiny_model_dir, served_root)
    finally:
        shutil.rmtree(served_root / name)


def test_files_symlinked_out_of_the_root_are_not_served(client, served_root, adapter_root, tmp_path,
                                                        tiny_model_dir):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "team" / "lora-all", outside)
    (served_root / "linked-files").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / name, served_root / "linked-files" / name)
    try:
        code, details = code_of(client.generate, "hi", "linked-files")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "outside the adapter root" in details
        assert str(tmp_path) not in details
        info = {a.adapter_id: a for a in client.list_adapters()}["linked-files"]
        assert info.state == pb.LOAD_FAILED and "outside the adapter root" in info.error
        serves_peft_tokens(client, tiny_model_dir, served_root)
    finally:
        shutil.rmtree(served_root / "linked-files")


def test_merge_overwrite_never_removes_a_nested_adapter(client, served_root, adapter_root, tiny_model_dir):
    shutil.copytree(adapter_root / "lora-qv", served_root / "nest")
    shutil.copytree(adapter_root / "lora-rs", served_root / "nest" / "inner")
    try:
        request = pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora-qv", weight=0.5)],
                                         output_adapter_id="nest", overwrite=True)
        code, details = code_of(lambda: list(client.merge(request)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "other directories" in details
        assert str(served_root) not in details
        serves_peft_tokens(client, tiny_model_dir, served_root, "nest/inner")
    finally:
        shutil.rmtree(served_root / "nest")


@pytest.mark.parametrize("output", ["a\x00b", "~no-such-user-here/out", "x" * 300])
def test_odd_merge_output_paths_are_invalid_argument_without_a_traceback(client, output, served_root,
                                                                          tiny_model_dir):
    request = pb.MergeAdapterRequest(adapters=[pb.WeightedAdapter(adapter_id="lora-qv")], output_model_dir=output)
    code, details = code_of(lambda: list(client.merge(request)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output_model_dir" in details, details
    assert "Traceback" not in details and str(served_root.parent) not in details
    serves_peft_tokens(client, tiny_model_dir, served_root)


def test_rank_and_alpha_patterns_give_pefts_tokens(client, served_root, tiny_model_dir):
    """Pattern keys are matched by RE2 now: a PEFT adapter with regex rank/alpha patterns still gives PEFT's
    greedy tokens (PEFT matches them with Python's re)."""
    make_lora_adapter(tiny_model_dir, served_root / "patterned", r=8, alpha=16, seed=31,
                      targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 4},
                      alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3, "down_proj": 40})
    serves_peft_tokens(client, tiny_model_dir, served_root, "patterned")
