"""Adapter files are read with bounds: regular files only, configs and weights capped and checked before any
large read, each file inside the root, errors naming the file and never a server path."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import pytest

from adapterd.server.adapters.files import (
    MAX_CONFIG_BYTES,
    adapter_bytes_cap,
    adapter_file,
    parse_config,
    read_config,
)
from adapterd.server.adapters.peft_format import read_adapter
from adapterd.server.errors import DataLoss, FailedPrecondition
from adapterd.server.safetensors_io import read_tensors


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_a_fifo_config_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "adapter_config.json")
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(_raises(read_config, tmp_path / "adapter_config.json")),
                              daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], FailedPrecondition) and "not a regular file" in str(outcome[0])


def _raises(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    raise AssertionError("no error")


def test_a_huge_config_is_refused_unread(tmp_path):
    path = tmp_path / "adapter_config.json"
    with open(path, "wb") as f:
        f.truncate(300 * 1024**2)  # sparse: 300 MB declared, nothing on disk
    before, started = rss_bytes(), time.monotonic()
    with pytest.raises(FailedPrecondition, match="larger than") as err:
        read_config(path)
    assert time.monotonic() - started < 1 and rss_bytes() - before < 16 * 1024**2
    assert str(tmp_path) not in str(err.value)


def test_a_config_just_under_the_cap_is_read(tmp_path):
    path = tmp_path / "adapter_config.json"
    body = json.dumps({"peft_type": "LORA", "pad": "x" * (MAX_CONFIG_BYTES - 100)})
    path.write_text(body)
    assert read_config(path)["peft_type"] == "LORA"


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                 b'{"a": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}"])
def test_deep_nesting_is_refused_cleanly(raw):
    with pytest.raises(FailedPrecondition, match="nested"):
        parse_config(raw)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"not json", b"[1, 2]", b'{"r": 1' + b"1" * 5000 + b"}"])
def test_damaged_configs_are_data_loss(raw):
    with pytest.raises(DataLoss):
        parse_config(raw)


def test_files_symlinked_out_of_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    os.symlink(outside / "adapter_config.json", root / "a" / "adapter_config.json")
    with pytest.raises(FailedPrecondition, match="adapter_config.json resolves outside the adapter root") as err:
        read_adapter(root, root / "a")
    assert str(tmp_path) not in str(err.value)
    (root / "shared.json").write_text("{}")  # a link that stays inside the root is fine
    os.symlink(root / "shared.json", root / "a" / "inside.json")
    assert adapter_file(root, root / "a", "inside.json") == (root / "shared.json").resolve()


def test_a_sparse_weights_file_with_a_small_header_is_refused_unread(tmp_path):
    """2 GiB on paper, a header that says 8x64: refused from the header, nothing read, nothing kept."""
    path = tmp_path / "adapter_model.safetensors"
    head = safetensors_bytes({"w": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 8 * 64 * 4]}})
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(2 * 1024**3)
    before, started = rss_bytes(), time.monotonic()
    with pytest.raises(DataLoss, match="describes") as err:
        read_tensors(path)
    assert time.monotonic() - started < 1 and rss_bytes() - before < 16 * 1024**2
    assert str(tmp_path) not in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_weights_declaring_more_than_the_cap_are_refused_unread(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    nbytes = 2 * 1024**3
    head = safetensors_bytes({"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}})
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + nbytes)  # consistent, and sparse
    before = rss_bytes()
    with pytest.raises(FailedPrecondition, match="declares"):
        read_tensors(path, max_data_bytes=adapter_bytes_cap({"q": (64, 64)}, 8))
    assert rss_bytes() - before < 16 * 1024**2


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},  # bytes do not match the shape
    {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}},
    {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
    {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}},
    {"w": [1, 2]},
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},  # overlapping tensors
     "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
])
def test_inconsistent_headers_are_data_loss(tmp_path, header):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 16))
    with pytest.raises(DataLoss):
        read_tensors(path)


def test_a_huge_header_length_is_refused(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 50 * 1024**2))
        f.truncate(60 * 1024**2)
    with pytest.raises(FailedPrecondition, match="header"):
        read_tensors(path)
