"""ListAdapters per entry: one odd adapter is listed as LOAD_FAILED with its reason, the rest normally, and
descriptions of adapters not loaded are cached by the config's modification time and size."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from adapterd.server.adapters import store as store_module
from adapterd.server.adapters.store import LOAD_FAILED, ON_DISK, AdapterStore
from tests.server.adapters.test_store import _cpu_shape

ODD_CONFIGS = {
    "neg-rank": {"peft_type": "LORA", "r": -1},
    "huge-rank": {"peft_type": "LORA", "r": 2**70},
    "float-rank": {"peft_type": "LORA", "r": 8.5},
    "bad-type": {"peft_type": ["LORA"]},
    "prefix-neg": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": -3},
}


@pytest.fixture()
def odd_root(tmp_path, adapter_root):
    root = tmp_path / "root"
    shutil.copytree(adapter_root, root)
    for name, config in ODD_CONFIGS.items():
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    (root / "deep").mkdir()
    (root / "deep" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "[" * 5000 + "]" * 5000 + "}")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_config.json")
    (tmp_path / "outside").mkdir()
    shutil.copytree(adapter_root / "lora-qv", tmp_path / "outside" / "lora")
    (root / "linked").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(tmp_path / "outside" / "lora" / name, root / "linked" / name)
    (root / "surrogate").mkdir()  # JSON may spell a lone surrogate, which protobuf cannot encode
    (root / "surrogate" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj\\ud800"], "base_model_name_or_path": "\\udfff"}')
    return root


def test_odd_entries_are_listed_as_load_failed_and_the_rest_normally(odd_root, tiny_model_dir):
    store = AdapterStore(odd_root, _cpu_shape(tiny_model_dir, torch.float32))
    records = {r.adapter_id: r for r in store.list()}
    for name in [*ODD_CONFIGS, "deep", "fifo", "linked"]:
        assert records[name].state == LOAD_FAILED and records[name].error, name
        assert str(odd_root.parent) not in records[name].error
    assert "positive integer" in records["neg-rank"].error and "positive integer" in records["huge-rank"].error
    assert "nested" in records["deep"].error and "not a regular file" in records["fifo"].error
    assert "outside the adapter root" in records["linked"].error
    assert records["surrogate"].state == ON_DISK
    for text in (*records["surrogate"].target_modules, records["surrogate"].base_model):
        text.encode("utf-8")  # encodable: the listing can be sent
    good = records["lora-qv"]
    assert good.state == ON_DISK and good.type == "LORA" and good.rank == 8 and not good.error
    assert records["prefix"].num_virtual_tokens == 6 and records["team/lora-all"].rank == 4


def test_a_listing_survives_an_entry_that_raises(odd_root, tiny_model_dir, monkeypatch):
    store = AdapterStore(odd_root, _cpu_shape(tiny_model_dir, torch.float32))
    real = store_module.describe_config

    def explode(config):
        if config.get("r") == 8:
            raise RuntimeError("/srv/secret/path boom")
        return real(config)

    monkeypatch.setattr(store_module, "describe_config", explode)
    records = {r.adapter_id: r for r in store.list()}
    assert records["lora-qv"].state == LOAD_FAILED and "/srv/secret" not in records["lora-qv"].error
    assert records["team/lora-all"].state == ON_DISK


def test_descriptions_are_cached_until_the_config_changes(adapter_root, tmp_path, tiny_model_dir, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(adapter_root, root)
    store = AdapterStore(root, _cpu_shape(tiny_model_dir, torch.float32))
    reads: list[str] = []
    real = store_module.read_config
    monkeypatch.setattr(store_module, "read_config", lambda path: reads.append(path.parent.name) or real(path))
    first = store.list()
    assert len(reads) == len(first)
    assert [r.rank for r in store.list()] == [r.rank for r in first] and len(reads) == len(first)
    config = json.loads((root / "lora-qv" / "adapter_config.json").read_text())
    config["r"] = 12
    (root / "lora-qv" / "adapter_config.json").write_text(json.dumps(config))
    again = {r.adapter_id: r for r in store.list()}
    assert reads[len(first):] == ["lora-qv"] and again["lora-qv"].rank == 12


def test_a_config_without_r_still_loads_from_its_tensors(adapter_root, tmp_path, tiny_model_dir):
    """PEFT defaults r; only a present, malformed r is refused."""
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "lora-qv", root / "no-r")
    config = json.loads((root / "no-r" / "adapter_config.json").read_text())
    del config["r"]
    (root / "no-r" / "adapter_config.json").write_text(json.dumps(config))
    store = AdapterStore(root, _cpu_shape(tiny_model_dir, torch.float32))
    assert store.list()[0].state == ON_DISK
    assert store.load("no-r").rank == 8
