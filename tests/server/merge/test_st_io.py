"""The streaming safetensors writer produces files safetensors itself reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterd.server.errors import DataLoss
from adapterd.server.merge.st_io import ShardWriter, plan_shards, read_header, write_index


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
