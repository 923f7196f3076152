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
