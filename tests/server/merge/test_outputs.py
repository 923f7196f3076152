"""Merge outputs: an overwrite removes nothing but the one output it replaces; odd output paths and odd input
files get documented codes naming the field, never a server path."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from adapterd.server.errors import AdapterdError, DataLoss, FailedPrecondition, InvalidArgument
from adapterd.server.merge import Merger
from tests.server.merge.conftest import leftovers


@pytest.fixture
def root(tmp_path, adapter_root):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root, root)
    return root


def test_overwrite_never_removes_an_adapter_nested_under_the_output(tiny_model_dir, root, adapter_root):
    shutil.copytree(adapter_root / "lora-qv", root / "team-x")
    shutil.copytree(adapter_root / "lora-rs", root / "team-x" / "inner")
    merger = Merger(tiny_model_dir, root)
    with pytest.raises(FailedPrecondition, match="other directories") as err:
        merger.merge_to_adapter([("lora-qv", 0.5)], "team-x", overwrite=True)
    assert err.value.field == "output_adapter_id" and str(root) not in str(err.value)
    assert (root / "team-x" / "inner" / "adapter_model.safetensors").is_file()
    assert (root / "team-x" / "adapter_model.safetensors").is_file()
    assert leftovers(root) == []
    shutil.rmtree(root / "team-x" / "inner")  # alone, the adapter is replaced as before
    merger.merge_to_adapter([("lora-qv", 0.5)], "team-x", overwrite=True)
    assert json.loads((root / "team-x" / "adapter_config.json").read_text())["r"] == 8
    assert leftovers(root) == []


def test_a_model_overwrite_keeps_nested_directories(tiny_model_dir, root, tmp_path):
    merger = Merger(tiny_model_dir, root)
    out = tmp_path / "out"
    merger.merge_to_model([("lora-qv", 1.0)], out)
    (out / "keep").mkdir()
    (out / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="other directories"):
        merger.merge_to_model([("lora-qv", 1.0)], out, overwrite=True)
    assert (out / "keep" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("output, code", [
    ("a\x00b", InvalidArgument), ("x" * 300, InvalidArgument), ("a/" * 2100, InvalidArgument),
    ("a/" * 1990, InvalidArgument),  # short enough alone, too long once joined to the output root
    ("../../escape", InvalidArgument), ("/etc/evil", InvalidArgument), ("file-here/sub", FailedPrecondition),
])
def test_odd_model_output_paths_get_documented_codes(tiny_model_dir, root, tmp_path, output, code):
    out_root = tmp_path / "merged"
    out_root.mkdir()
    (out_root / "file-here").write_text("a file where a directory is needed")
    merger = Merger(tiny_model_dir, root, output_root=out_root)
    with pytest.raises(code) as err:
        merger.merge_to_model([("lora-qv", 1.0)], output)
    assert err.value.field == "output_model_dir"
    assert str(tmp_path) not in str(err.value) and "Traceback" not in str(err.value)
    assert sorted(p.name for p in out_root.iterdir()) == ["file-here"]


def test_an_unknown_home_directory_is_invalid_on_the_command_line(tiny_model_dir, root):
    with pytest.raises(InvalidArgument) as err:
        Merger(tiny_model_dir, root).merge_to_model([("lora-qv", 1.0)], "~no-such-user-here/out")
    assert err.value.field == "output_model_dir"


def test_input_files_symlinked_out_of_the_root_are_refused(tiny_model_dir, root, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "lora-qv", outside)
    (root / "linked").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / name, root / "linked" / name)
    with pytest.raises(FailedPrecondition, match="outside the adapter root") as err:
        Merger(tiny_model_dir, root).merge_to_adapter([("linked", 1.0)], "copy")
    assert err.value.field == "adapters[0].adapter_id" and str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("config", [
    {"peft_type": "LORA", "r": "eight", "lora_alpha": 8},
    {"peft_type": "LORA", "r": 8, "lora_alpha": float("nan")},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "alpha_pattern": {"(a)\\1": 2}},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": ["q_proj"]},
])
def test_odd_input_configs_are_refused_naming_the_adapter(tiny_model_dir, root, config):
    with open(root / "lora-qv" / "adapter_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises((DataLoss, FailedPrecondition)) as err:
        Merger(tiny_model_dir, root).merge_to_adapter([("lora-qv", 1.0)], "copy")
    assert isinstance(err.value, AdapterdError) and err.value.field == "adapters[0].adapter_id"
    assert "lora-qv" in str(err.value) and str(root) not in str(err.value)
    assert not (root / "copy").exists()
