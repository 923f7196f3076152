"""Safetensors I/O: the streaming writer produces files safetensors itself reads back exactly; the one-read
loader gives the library's tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterd.server.errors import DataLoss
from adapterd.server.safetensors_io import ShardWriter, plan_shards, read_header, write_index


def _source(tmp_path):
    tensors = {"a.bf16": torch.randn(3, 5).to(torch.bfloat16),  # odd byte count before wider items
               "b.f32": torch.randn(7, 2), "c.i64": torch.arange(5), "d.f16": torch.randn(4).half(),
               "e.empty": torch.zeros(0, 3)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, str(path))
    return tensors, path


def test_copy_and_write_round_trip(tmp_path):
    tensors, path = _source(tmp_path)
    entries = read_header(path)
    plans = plan_shards(entries, max_shard_bytes=40)
    assert len(plans) > 1
    out = tmp_path / "out"
    out.mkdir()
    for plan in plans:
        writer = ShardWriter(out / plan.filename, plan)
        for e in plan.entries:
            if e.name == "b.f32":
                writer.write_tensor(e, tensors["b.f32"] * 2)
            else:
                writer.copy_entry(e, chunk_bytes=3)  # tiny chunks exercise the copy loop
        writer.close()
    write_index(out, plans)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, expected in tensors.items():
        with safe_open(out / index["weight_map"][name], "pt") as f:
            got = f.get_tensor(name)
        want = expected * 2 if name == "b.f32" else expected
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_writer_refuses_wrong_shape_and_order(tmp_path):
    _, path = _source(tmp_path)
    (plan,) = plan_shards(read_header(path), max_shard_bytes=1 << 20)
    writer = ShardWriter(tmp_path / plan.filename, plan)
    with pytest.raises(RuntimeError, match="out of plan order"):
        writer.copy_entry(plan.entries[1])
    with pytest.raises(RuntimeError, match="planned"):
        writer.write_tensor(plan.entries[0], torch.zeros(1))
    with pytest.raises(RuntimeError, match="exceed"):
        writer.write_blocks(plan.entries[0], [torch.zeros(1000)])
    with pytest.raises(RuntimeError, match="closed after 0"):
        writer.close()


def test_truncated_file_is_data_loss(tmp_path):
    _, path = _source(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataLoss):
        read_header(path)
    path.write_bytes(b"\xff" * 4)
    with pytest.raises(DataLoss):
        read_header(path)


def test_read_tensors_equals_the_library_in_one_buffer(tmp_path):
    from safetensors.torch import load_file, save_file

    from adapterd.server.safetensors_io import read_tensors

    # An odd-sized fp16 tensor before an fp32 one: the fp32 bytes may not be 4-aligned in the buffer.
    tensors = {"a.half": torch.randn(3, dtype=torch.float16), "b.float": torch.randn(2, 5),
               "c.bf16": torch.randn(4, 7).to(torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    got, expected = read_tensors(path), load_file(str(path))
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name])
    shared = {t.untyped_storage().data_ptr() for n, t in got.items() if n != "b.float"}
    assert len(shared) == 1  # views into one buffer (a misaligned tensor may get its own copy)


def test_read_tensors_refuses_truncated_files_and_integer_tensors(tmp_path):
    from safetensors.torch import save_file

    from adapterd.server.errors import DataLoss, FailedPrecondition
    from adapterd.server.safetensors_io import read_tensors

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataLoss, match="outside the file|truncated"):
        read_tensors(path)
    save_file({"w": torch.ones(4, dtype=torch.int32)}, str(path))
    with pytest.raises(FailedPrecondition, match="I32"):
        read_tensors(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       ")
    with pytest.raises(DataLoss, match="corrupt"):
        read_tensors(path)


# ------------------------------------------------------------------------------- the host buffer pool

def _adapter_file(path, seed: int, rows: int = 256, dtype=torch.float32):
    """A file of ~``rows`` KiB of tensors whose values depend on ``seed``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {"x.lora_A.weight": torch.randn(rows, 128, generator=g).to(dtype),
               "x.lora_B.weight": torch.randn(rows, 128, generator=g).to(dtype)}
    save_file(tensors, str(path))
    return tensors


def _ptr(tensors) -> int:
    return next(iter(tensors.values())).untyped_storage().data_ptr()


def test_pool_reuses_a_released_buffer_and_the_second_file_reads_back_exactly(tmp_path):
    from adapterd.server.pinned import HostBufferPool
    from adapterd.server.safetensors_io import read_tensors

    made = []
    pool = HostBufferPool(max_bytes=8 << 20, allocate=lambda n: made.append(n) or torch.empty(n, dtype=torch.uint8))
    first = _adapter_file(tmp_path / "a.safetensors", seed=1)
    second = _adapter_file(tmp_path / "b.safetensors", seed=2)
    got = read_tensors(tmp_path / "a.safetensors", pool=pool)
    assert all(torch.equal(got[n], first[n]) for n in first)
    storage = next(iter(got.values())).untyped_storage()
    assert storage.nbytes() == sum(t.nbytes for t in first.values())  # exactly the data: stage_on copies it all
    ptr = storage.data_ptr()
    del got, storage
    got = read_tensors(tmp_path / "b.safetensors", pool=pool)
    assert _ptr(got) == ptr  # the same memory, read again
    assert all(torch.equal(got[n], second[n]) for n in second)  # and it holds the second file, exactly
    assert made == [1 << 20] and pool.stats()["reuses"] == 1 and pool.stats()["allocations"] == 1


def test_pool_never_lends_a_buffer_while_a_view_of_it_lives(tmp_path):
    from adapterd.server.pinned import HostBufferPool
    from adapterd.server.safetensors_io import read_tensors

    pool = HostBufferPool(max_bytes=8 << 20)
    first = _adapter_file(tmp_path / "a.safetensors", seed=1)
    second = _adapter_file(tmp_path / "b.safetensors", seed=2)
    got = read_tensors(tmp_path / "a.safetensors", pool=pool)
    kept = got["x.lora_B.weight"][3:5].t()  # one small view of one tensor keeps the whole buffer lent
    ptr = _ptr(got)
    del got
    again = read_tensors(tmp_path / "b.safetensors", pool=pool)
    assert _ptr(again) != ptr
    assert torch.equal(kept, first["x.lora_B.weight"][3:5].t())  # untouched by the second read
    assert all(torch.equal(again[n], second[n]) for n in second)
    del kept, again
    assert pool.stats()["lent_bytes"] == 0 and pool.stats()["pool_bytes"] == 2 << 20


def test_pool_respects_its_cap_and_falls_back_to_private_buffers(tmp_path):
    from adapterd.server.pinned import HostBufferPool
    from adapterd.server.safetensors_io import read_tensors

    pool = HostBufferPool(max_bytes=2 << 20)  # two 1 MiB buffers
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    want = [_adapter_file(f, seed=i) for i, f in enumerate(files)]
    held = [read_tensors(f, pool=pool) for f in files]
    stats = pool.stats()
    assert stats["pool_bytes"] == 2 << 20 and stats["fallbacks"] == 1 and stats["allocations"] == 2
    assert len({_ptr(h) for h in held}) == 3
    for got, expected in zip(held, want, strict=True):
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    fallback_ptr = _ptr(held[2])
    del held[2]  # a private buffer: it never joins the pool
    assert pool.stats()["free_bytes"] == 0
    del held[0]
    assert pool.stats()["free_bytes"] == 1 << 20
    assert _ptr(read_tensors(files[2], pool=pool)) != fallback_ptr and pool.stats()["reuses"] == 1


def test_pool_grows_by_dropping_a_free_buffer_too_small_for_a_larger_file(tmp_path):
    from adapterd.server.pinned import HostBufferPool
    from adapterd.server.safetensors_io import read_tensors

    pool = HostBufferPool(max_bytes=5 << 19)  # 2.5 MiB: a 1 MiB and a 2 MiB buffer do not fit together
    small = _adapter_file(tmp_path / "small.safetensors", seed=1, rows=256)  # 256 KiB: a 1 MiB buffer
    large = _adapter_file(tmp_path / "large.safetensors", seed=2, rows=4096)  # 4 MiB: past the cap
    read_tensors(tmp_path / "small.safetensors", pool=pool)  # lent, then returned at once
    assert pool.stats()["free_bytes"] == 1 << 20
    got = read_tensors(tmp_path / "large.safetensors", pool=pool)
    assert pool.stats()["fallbacks"] == 1 and pool.stats()["free_bytes"] == 1 << 20  # nothing dropped for it
    assert all(torch.equal(got[n], large[n]) for n in large)
    del got
    medium = _adapter_file(tmp_path / "medium.safetensors", seed=3, rows=2048)  # 2 MiB: fits if 1 MiB goes
    got = read_tensors(tmp_path / "medium.safetensors", pool=pool)
    assert all(torch.equal(got[n], medium[n]) for n in medium)
    stats = pool.stats()
    assert stats["pool_bytes"] == 2 << 20 == stats["lent_bytes"] and stats["allocations"] == 2
    del got
    got = read_tensors(tmp_path / "small.safetensors", pool=pool)  # the larger buffer serves a smaller file
    assert all(torch.equal(got[n], small[n]) for n in small) and pool.stats()["reuses"] == 1


def test_pool_is_safe_under_concurrent_loads():
    import random
    import threading

    from adapterd.server.pinned import HostBufferPool

    pool = HostBufferPool(max_bytes=6 << 20)
    errors = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        for _ in range(300):
            buf = pool.take(rng.randint(1, 3 << 20) // 8 * 8)
            buf.fill_(k)
            view = buf[::4096]  # only a view survives the next line: the buffer must stay lent
            del buf
            if rng.random() < 0.5:
                threading.Event().wait(0.0001)
            if not bool((view == k).all()):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pool.stats()
    assert not errors
    assert stats["pool_bytes"] <= 6 << 20 and stats["lent_bytes"] == 0 and stats["reuses"] > 0


@pytest.mark.gpu
def test_pinned_pool_waits_for_the_copy_out_of_a_released_buffer():
    from adapterd.server.pinned import HostBufferPool

    pool = HostBufferPool(max_bytes=256 << 20, pin=True)
    n = 64 << 20
    host = pool.take(n)
    assert host.is_pinned() and host.untyped_storage().nbytes() == n
    ptr = host.data_ptr()
    host.fill_(1)
    torch.cuda._sleep(200_000_000)  # the copy below waits behind ~0.1 s of device time
    device = host.to("cuda", non_blocking=True)  # as stage_on copies: async, out of the pinned buffer
    del host  # released while the copy has not even started
    again = pool.take(n)
    assert again.data_ptr() == ptr and pool.stats()["reuses"] == 1
    again.fill_(2)  # had take() not waited for the copy, the device would receive these bytes
    torch.cuda.synchronize()
    assert bool((device == 1).all())


@pytest.mark.gpu
def test_store_on_cuda_reads_into_pinned_pool_buffers_and_reuses_them(tiny_model_dir, adapter_root):
    from transformers import AutoModelForCausalLM

    from adapterd.server.adapters.lora import linear_shapes, stage_on
    from adapterd.server.adapters.store import AdapterStore, BaseShape

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    c = model.config
    shape = BaseShape(linear_shapes=linear_shapes(model), num_layers=c.num_hidden_layers,
                      num_kv_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                      dtype=torch.float32, device=torch.device("cuda"), max_lora_rank=64)
    store = AdapterStore(adapter_root, shape)
    adapter = store.load("lora-qv")
    module = next(iter(adapter.lora.modules.values()))
    assert module.a.is_pinned()
    ptr = module.a.untyped_storage().data_ptr()
    staged = stage_on(torch.device("cuda"), adapter.lora.modules)  # one async copy out of the pool buffer
    want = {n: (m.a.clone(), m.b.clone()) for n, m in adapter.lora.modules.items()}
    del adapter, module
    store.unload("lora-qv")
    again = store.load("lora-qv")
    assert next(iter(again.lora.modules.values())).a.untyped_storage().data_ptr() == ptr
    torch.cuda.synchronize()
    for name, (a, b) in want.items():
        assert torch.equal(staged[name].a.cpu(), a) and torch.equal(staged[name].b.cpu(), b)
