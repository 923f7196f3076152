"""Atomic publishing (``common/fsutil.py``), the one way every output reaches its name: whole or absent,
flushed to disk before and after the rename, modes from the umask.

The writers below used to be four helpers that disagreed: status.json, train_config.json and metrics.jsonl
were renamed without any fsync, an exported adapter's directory entry was never flushed, and a merged
model's side files (config.json, tokenizer) were published without being flushed. Each test here failed on
that code (a crash after the rename could leave an empty or missing file under the published name)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterd.common.fsutil import AtomicDir, write_atomic


@pytest.fixture
def fsynced(monkeypatch) -> Iterator[list[Path]]:
    """Every path given to ``os.fsync`` while the test runs (the real fsync still runs), in call order."""
    real = os.fsync
    seen: list[Path] = []

    def record(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)
    monkeypatch.setattr(os, "fsync", record)
    yield seen


@pytest.fixture
def umask_027() -> Iterator[int]:
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


def _published_whole(path: Path, fsynced: list[Path]) -> None:
    """``path``'s contents were flushed (through its temporary name, in the same directory) and then the
    directory holding the new name."""
    parent = path.parent.resolve()
    files = [p for p in fsynced if p.parent == parent and p.name.startswith(f".{path.name}.")]
    assert files, f"{path.name} was never flushed before its rename"
    assert fsynced.index(parent) > fsynced.index(files[-1]), "the directory was not flushed after the rename"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], "a temporary file"


def test_status_json_is_flushed_before_and_after_its_rename(tmp_path, fsynced):
    from adapterd.trainer.status import write_json_atomic

    write_json_atomic(tmp_path / "status.json", {"state": "running", "step": 3})
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 3
    _published_whole(tmp_path / "status.json", fsynced)


def test_a_run_config_and_its_metrics_are_flushed(make_train_config, tmp_path, fsynced):
    from adapterd.trainer.resume import CONFIG_FILE, METRICS_FILE, truncate_metrics, write_config

    write_config(tmp_path, make_train_config())
    _published_whole(tmp_path / CONFIG_FILE, fsynced)
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    fsynced.clear()
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / METRICS_FILE).read_text().count("\n") == 2
    _published_whole(tmp_path / METRICS_FILE, fsynced)


@pytest.fixture
def make_train_config(tiny_model_dir, tmp_path):
    from adapterd.trainer.config import TrainConfig

    return lambda: TrainConfig(base=str(tiny_model_dir), data="data.json", output=str(tmp_path))


def _flushed_then_renamed(out: Path, fsynced: list[Path]) -> None:
    """Every file of the directory ``out`` was flushed under the temporary name, then ``out``'s parent."""
    parent = out.parent.resolve()
    temp_files = {p.name for p in fsynced if p.parent.parent == parent and p.parent.name.startswith(f".{out.name}.")}
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert names and names <= temp_files, f"published without a flush: {sorted(names - temp_files)}"
    assert parent in fsynced, "the directory entry of the output was never flushed"


def test_an_exported_adapter_is_flushed_then_its_directory_entry(adapter_root, tmp_path, fsynced):
    from adapterd.trainer.checkpoint import export_adapter

    out = export_adapter(adapter_root / "lora-qv", tmp_path / "exported" / "v1")
    _flushed_then_renamed(out, fsynced)


def test_every_file_of_a_merged_model_is_flushed_before_it_is_published(tiny_model_dir, adapter_root, tmp_path,
                                                                        fsynced):
    from adapterd.server.merge import Merger

    out = tmp_path / "merged"
    Merger(tiny_model_dir, adapter_root).merge_to_model([("lora-qv", 1.0)], out)
    assert (out / "config.json").is_file()
    _flushed_then_renamed(out, fsynced)


def test_write_atomic_follows_the_umask_and_leaves_no_temporary_file(tmp_path, umask_027):
    path = tmp_path / "out.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask_027  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_atomic_dir_is_whole_or_absent(tmp_path, umask_027):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), AtomicDir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the writer failed half-way")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory
    with AtomicDir(target) as tmp:
        (tmp / "a").write_text("a")
        os.chmod(tmp / "a", 0o600)  # as safetensors' save_file leaves its file
    assert stat.S_IMODE((target / "a").stat().st_mode) == 0o666 & ~umask_027
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask_027  # not mkdtemp's 0700
    with pytest.raises(FileExistsError), AtomicDir(target):
        pass
    assert (target / "a").read_text() == "a"


def test_an_atomic_dir_replaces_only_when_asked_and_checks_again_at_the_rename(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with AtomicDir(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the replaced one removed

    def refuse_once_taken(path: Path) -> None:
        if (path / "taken").exists():
            raise PermissionError("taken meanwhile")
    with pytest.raises(PermissionError), AtomicDir(target, replace=True, check=refuse_once_taken) as tmp:
        (target / "taken").write_text("by another writer")  # appears while the output is being written
    assert sorted(p.name for p in target.iterdir()) == ["new", "taken"]
    shutil.rmtree(target)


def test_the_shared_pieces_import_no_torch():
    """The daemon's metrics and TrainStatus, and the trainer's command line, read run files and GPUs
    without paying for torch's import (seconds)."""
    code = ("import sys, adapterd.common.fsutil, adapterd.common.nvml, adapterd.trainer.status, "
            "adapterd.trainer.runlock; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
