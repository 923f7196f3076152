"""Faults: random bytes as adapter files, a base without a tokenizer, out of memory during an adapter load or
a step, and a disk that fills during an adapter merge or a checkpoint. Each gets a clear error, and the
daemon goes on serving everyone else. (An adapter for another base, damaged files over gRPC and a client
that leaves mid-stream are in test_adapters_rpc.py and test_generate_rpc.py.)"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import shutil
import threading
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterd.clients import AdapterdClient
from adapterd.server.adapters import store as store_module
from adapterd.server.adapters.ids import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.adapters.store import LOAD_FAILED, ON_DISK, AdapterStore, BaseShape
from adapterd.server.app import DaemonThread, serve
from adapterd.server.config import ServerConfig
from adapterd.server.errors import DataLoss, FailedPrecondition, NotFound, ResourceExhausted
from tests.helpers import TEST_DEVICE
from tests.server.conftest import start_daemon

# ------------------------------------------------------------------------------- random bytes as adapter files


@pytest.fixture(scope="module")
def base_shape(tiny_model_dir) -> BaseShape:
    from transformers import AutoModelForCausalLM

    from adapterd.server.adapters.lora import linear_shapes

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    c = model.config
    return BaseShape(linear_shapes=linear_shapes(model), num_layers=c.num_hidden_layers,
                     num_kv_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                     dtype=torch.float32, device=torch.device("cpu"), max_lora_rank=64)


def _json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _configs(real: dict) -> st.SearchStrategy[bytes]:
    """Random bytes; or a real config with some fields given random values, dropped or added."""
    keys = sorted(real) + ["peft_type", "r", "lora_alpha", "target_modules", "num_virtual_tokens",
                           "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "prefix_projection"]
    mutated = st.builds(
        lambda changes, drop: json.dumps({**{k: v for k, v in real.items() if k not in drop}, **changes}),
        st.dictionaries(st.sampled_from(keys), _json_values() | st.sampled_from(["LORA", "PREFIX_TUNING"]),
                        max_size=4),
        st.sets(st.sampled_from(sorted(real)), max_size=3))
    return st.one_of(st.binary(max_size=512), mutated.map(str.encode),
                     _json_values().map(lambda v: json.dumps(v).encode()))


def _weights(real: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes; the real file truncated anywhere; the real file with bytes overwritten anywhere."""
    truncated = st.integers(0, len(real) - 1).map(lambda n: real[:n])
    flipped = st.lists(st.tuples(st.integers(0, len(real) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: bytes(_apply(real, edits)))
    return st.one_of(st.binary(max_size=2048), truncated, flipped)


def _apply(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for i, value in edits:
        out[i] = value
    return out


_ids = itertools.count()


@pytest.mark.parametrize("source", ["lora-qv", "prefix-proj"])
def test_random_adapter_files_give_only_clean_errors(source, adapter_root, base_shape, tmp_path_factory):
    """Whatever the bytes, AdapterStore.load either loads or raises DATA_LOSS / FAILED_PRECONDITION /
    NOT_FOUND, never another exception type, and the store keeps working."""
    root = tmp_path_factory.mktemp(f"fuzz-{source}")
    store = AdapterStore(root, base_shape)
    real_config = json.loads((adapter_root / source / CONFIG_FILE).read_text())
    real_weights = (adapter_root / source / WEIGHTS_FILE).read_bytes()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config=_configs(real_config), weights=_weights(real_weights) | st.none())
    def check(config: bytes, weights: bytes | None) -> None:
        adapter_id = f"a{next(_ids)}"
        path = root / adapter_id
        path.mkdir()
        (path / CONFIG_FILE).write_bytes(config)
        if weights is not None:
            (path / WEIGHTS_FILE).write_bytes(weights)
        try:
            store.load(adapter_id)
            store.unload(adapter_id)  # valid after all (e.g. an edit that changed nothing that matters)
        except (DataLoss, FailedPrecondition, NotFound) as exc:
            assert str(exc)
            assert store.record(adapter_id).state == LOAD_FAILED
        finally:
            shutil.rmtree(path)

    check()
    shutil.copytree(adapter_root / source, root / "good")
    assert store.load("good").type in ("LORA", "PREFIX_TUNING")


# --------------------------------------------------------------------------------------- missing tokenizer


def test_a_base_without_tokenizer_is_refused_at_start_up_naming_what_is_missing(tiny_model_dir, served_root,
                                                                                tmp_path, caplog):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("tokenizer*"))
    config = ServerConfig(base=base, adapters=served_root, quantization="none", port=0, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="has no tokenizer: none of tokenizer.json"):
        DaemonThread(config).start(load=False)
    with caplog.at_level(logging.ERROR, logger="adapterd.server.app"), pytest.raises(SystemExit) as exc:
        asyncio.run(serve(config))  # what `adapterd serve` runs: one line, exit 2, no traceback
    assert exc.value.code == 2 and f"cannot start: base model directory {base} has no tokenizer" in caplog.text


def test_serve_exits_1_saying_why_when_the_base_cannot_load(tiny_model_dir, served_root, tmp_path, caplog):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").write_bytes(b"\0" * 100)  # looks complete, cannot load
    config = ServerConfig(base=base, adapters=served_root, quantization="none", port=0, device=TEST_DEVICE)
    with caplog.at_level(logging.ERROR, logger="adapterd.server.app"), pytest.raises(SystemExit) as exc:
        asyncio.run(asyncio.wait_for(serve(config), 120))
    assert exc.value.code == 1
    assert f"cannot load the base model {base}" in caplog.text


# --------------------------------------------------------------------------------------------- out of memory


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.fixture(scope="module")
def inprocess(tiny_model_dir, served_root):
    """A daemon whose engine runs in the test's process, so that a failure can be injected into it."""
    d = start_daemon(tiny_model_dir, served_root, engine_process=False)
    yield d
    d.stop()


def test_out_of_memory_while_loading_an_adapter(inprocess, monkeypatch):
    daemon = inprocess
    client = AdapterdClient(f"127.0.0.1:{daemon.port}", timeout=60)
    store = daemon.daemon.state.runtime.store
    store.unload("team/lora-all")
    real = store_module.ADAPTER_KINDS["LORA"]
    failures = iter([True])

    def loader(config, tensors, base):
        if next(failures, False):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(config, tensors, base)

    monkeypatch.setitem(store_module.ADAPTER_KINDS, "LORA", loader)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("hello", "team/lora-all", max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in err.value.details()
    assert store.record("team/lora-all").state == ON_DISK  # transient: not marked as a bad adapter
    assert client.generate("hello", "team/lora-all", max_new_tokens=2).generated_token_count == 2
    store.unload("team/lora-all")
    monkeypatch.setitem(store_module.ADAPTER_KINDS, "LORA", _oom)
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter("team/lora-all")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_out_of_memory_in_a_step_fails_that_step_only(tiny_model_dir, served_root):
    """The rows in the failing step get RESOURCE_EXHAUSTED; the next requests are served, and greedy answers
    are the same as before the fault (the engine's state was cleaned up)."""
    d = start_daemon(tiny_model_dir, served_root, engine_process=False)  # the failure is injected in the engine
    jobs = [("hello world", ""), ("你是谁？", "lora-qv"), ("Tell me a story", "prefix")]
    try:
        target = f"127.0.0.1:{d.port}"
        with AdapterdClient(target, timeout=60) as c:
            before = [c.generate(p, a, max_new_tokens=8).text for p, a in jobs]
        engine = d.daemon.state.runtime.engine
        real_run = engine.runner.decoder.run  # the decode step, eager or replayed from a CUDA graph
        armed = threading.Event()

        def run(*args, **kwargs):
            if armed.is_set():
                armed.clear()
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_run(*args, **kwargs)

        engine.runner.decoder.run = run
        codes: list[grpc.StatusCode] = []
        started = threading.Barrier(len(jobs) + 1)

        def stream(prompt: str, adapter_id: str) -> None:
            with AdapterdClient(target, timeout=60) as c:
                call = c.generate_stream(prompt, adapter_id, max_new_tokens=400, min_new_tokens=400)
                try:
                    next(call)
                    started.wait()
                    for _ in call:
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=stream, args=job) for job in jobs]
        for t in threads:
            t.start()
        started.wait(30)  # every stream has its first message: all rows are in the running batch
        armed.set()
        for t in threads:
            t.join(60)
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * len(jobs)
        assert engine.stats() == {"running": 0, "waiting": 0, "pinned_slots": 0} and engine.runner.slots is not None
        with AdapterdClient(target, timeout=60) as c:
            after = [c.generate(p, a, max_new_tokens=8).text for p, a in jobs]
        assert after == before
        del engine.runner.decoder.run
    finally:
        d.stop()


def test_out_of_memory_in_a_prefill_ends_the_requests_being_admitted(tiny_model_dir, served_root):
    """Rows being prefilled are not in the running batch yet; a failing prefill must still end them (they
    would wait forever) and give back their LoRA slots."""
    d = start_daemon(tiny_model_dir, served_root, engine_process=False)  # the failure is injected in the engine
    try:
        engine = d.daemon.state.runtime.engine

        def prefill(rows):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        engine._prefill = prefill
        with AdapterdClient(f"127.0.0.1:{d.port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate("你是谁？", "lora-qv", max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            del engine._prefill
            key = d.daemon.state.runtime.store.get("lora-qv").key
            assert engine.call(lambda: engine.runner.slots.evict(key)).result(10)  # its slot is not pinned
            assert c.generate("你是谁？", "lora-qv", max_new_tokens=4).generated_token_count == 4
    finally:
        d.stop()


@pytest.mark.gpu
@pytest.mark.skipif(TEST_DEVICE == "cpu", reason="a real out-of-memory needs the GPU (ADAPTERD_TEST_DEVICE=cuda)")
def test_real_out_of_memory_on_the_gpu_fails_those_requests_and_the_daemon_goes_on(tiny_model_dir, served_root):
    """Not simulated: the device's memory is taken until an allocation fails, then a request arrives. It gets
    RESOURCE_EXHAUSTED; once memory is free again the same request is answered as before."""
    d = start_daemon(tiny_model_dir, served_root)
    try:
        target = f"127.0.0.1:{d.port}"
        with AdapterdClient(target, timeout=120) as c:
            before = c.generate("你是谁？", "lora-qv", max_new_tokens=8).text
            hog: list[torch.Tensor] = []
            for chunk in (2**30, 2**26, 2**20, 2**14):  # bytes: take every block the allocator can give
                while True:
                    try:
                        hog.append(torch.empty(chunk, dtype=torch.uint8, device=TEST_DEVICE))
                    except torch.OutOfMemoryError:
                        break
            try:
                with pytest.raises(grpc.RpcError) as err:
                    c.generate("Tell me a story about a robot. " * 20, "lora-qv", max_new_tokens=8)
            finally:
                hog.clear()
                torch.cuda.empty_cache()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "out of" in err.value.details() and "memory" in err.value.details()
            assert c.generate("你是谁？", "lora-qv", max_new_tokens=8).text == before
    finally:
        d.stop()


# ------------------------------------------------------------------------------------------------ disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_disk_full_during_an_adapter_merge_is_resource_exhausted_and_leaves_nothing(tiny_model_dir, served_root,
                                                                                   monkeypatch):
    from adapterd.server.merge import to_adapter
    from adapterd.server.merge.merger import Merger

    monkeypatch.setattr(to_adapter, "save", _enospc)  # the weights, serialised to be written, do not fit
    before = _leftovers(served_root)
    with pytest.raises(ResourceExhausted) as err:
        Merger(tiny_model_dir, served_root).merge_to_adapter([("lora-qv", 0.5), ("lora-qv", 0.5)], "full-disk")
    assert err.value.field == "output_adapter_id" and isinstance(err.value.__cause__, OSError)
    assert err.value.__cause__.errno == errno.ENOSPC
    assert not (served_root / "full-disk").exists() and _leftovers(served_root) == before


def test_disk_full_during_a_checkpoint_leaves_no_checkpoint_under_a_final_name(tmp_path, monkeypatch):
    from adapterd.trainer import checkpoint

    class Adapter:  # what save_checkpoint asks of a PEFT model
        def named_parameters(self):  # checked finite before saving
            return iter([("lora_A", torch.nn.Parameter(torch.zeros(2)))])

        def save_pretrained(self, directory: str) -> None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "adapter_config.json").write_text("{}")
            (Path(directory) / "adapter_model.safetensors").write_bytes(b"weights")

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = tmp_path / "run"
    run.mkdir()
    args = (Adapter(), optimizer, scheduler, checkpoint.DataPosition(), {})
    checkpoint.save_checkpoint(run, 1, *args, keep_last=3)
    monkeypatch.setattr(checkpoint.torch, "save", _enospc)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(run, 2, *args, keep_last=3)
    assert [step for step, _ in checkpoint.list_checkpoints(run)] == [1]  # resume finds checkpoint-1
    assert checkpoint.find_checkpoint(run, "latest").name == "checkpoint-1"
    checkpoint.remove_stale(run)  # what a resumed run does first
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]
