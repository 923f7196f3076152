"""Serving and merging read adapters through one reader (``peft_format``), so what one accepts the other
accepts, with the same meaning, and what one refuses the other refuses (issue 17's disagreements)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterd.server.errors import FailedPrecondition
from adapterd.server.merge import Merger
from tests.server.adapters.test_store import _cpu_shape

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def root(tmp_path, adapter_root) -> Path:
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root / "lora-qv", root / "lora-qv")
    return root


def _served(tiny_model_dir, root: Path, adapter_id: str):
    from adapterd.server.adapters.store import AdapterStore

    return AdapterStore(root, _cpu_shape(tiny_model_dir, torch.float32)).load(adapter_id)


def _merged_deltas(root: Path, adapter_id: str) -> dict[str, torch.Tensor]:
    """Module -> B @ A of a merged adapter (its scaling is 1: lora_alpha == r)."""
    config = json.loads((root / adapter_id / CONFIG).read_text())
    assert config["lora_alpha"] == config["r"]
    state = load_file(root / adapter_id / WEIGHTS)
    return {k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


def _peft_deltas(tiny_model_dir, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from tests.helpers import _load_base

    model = PeftModel.from_pretrained(_load_base(tiny_model_dir), adapter)
    return {f"base_model.model.{name}": m.get_delta_weight("default").detach()
            for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_a_config_without_lora_alpha_serves_and_merges_with_peft_default(tiny_model_dir, root):
    """PEFT's lora_alpha defaults to 8. Serving used it; the merge failed on the missing key."""
    config = json.loads((root / "lora-qv" / CONFIG).read_text())
    del config["lora_alpha"]
    (root / "lora-qv" / CONFIG).write_text(json.dumps(config))
    served = _served(tiny_model_dir, root, "lora-qv")
    assert {m.scaling for m in served.lora.modules.values()} == {8 / config["r"]}
    Merger(tiny_model_dir, root).merge_to_adapter([("lora-qv", 1.0)], "copy")
    want = _peft_deltas(tiny_model_dir, root / "lora-qv")
    got = _merged_deltas(root, "copy")
    assert sorted(got) == sorted(want)
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-6)


def test_the_merge_accepts_keys_that_kept_the_adapter_name_as_serving_does(tiny_model_dir, root):
    """``.lora_A.<name>.weight`` (a state dict saved with its adapter name) pairs like ``.lora_A.weight``."""
    shutil.copytree(root / "lora-qv", root / "named")
    state = load_file(root / "lora-qv" / WEIGHTS)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, root / "named" / WEIGHTS)
    plain, named = _served(tiny_model_dir, root, "lora-qv"), _served(tiny_model_dir, root, "named")
    assert sorted(named.lora.modules) == sorted(plain.lora.modules)
    merger = Merger(tiny_model_dir, root)
    merger.merge_to_adapter([("lora-qv", 1.0)], "from-plain")
    merger.merge_to_adapter([("named", 1.0)], "from-named")
    assert load_file(root / "from-named" / WEIGHTS).keys() == load_file(root / "from-plain" / WEIGHTS).keys()
    for name, delta in _merged_deltas(root, "from-plain").items():
        assert torch.equal(_merged_deltas(root, "from-named")[name], delta)


def test_a_bin_only_adapter_is_refused_by_the_merger_as_by_serving(tiny_model_dir, root, monkeypatch):
    """The README: pickles are refused. Serving refused adapter_model.bin; the merger torch.load-ed it."""
    torch.save(load_file(root / "lora-qv" / WEIGHTS), root / "lora-qv" / "adapter_model.bin")
    (root / "lora-qv" / WEIGHTS).unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pickle was loaded"))
    with pytest.raises(FailedPrecondition, match="adapter_model.bin") as served:
        _served(tiny_model_dir, root, "lora-qv")
    for merge in (lambda m: m.merge_to_adapter([("lora-qv", 1.0)], "copy"),
                  lambda m: m.merge_to_model([("lora-qv", 1.0)], root.parent / "model")):
        with pytest.raises(FailedPrecondition, match="adapter_model.bin") as merged:
            merge(Merger(tiny_model_dir, root))
        assert merged.value.field == "adapters[0].adapter_id" and str(root) not in str(merged.value)
    assert str(root) not in str(served.value)
    assert not (root / "copy").exists() and not (root.parent / "model").exists()
