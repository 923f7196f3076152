"""Combining adapters into a new adapter: each strategy equals PEFT's add_weighted_adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapterd.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from adapterd.server.merge import STRATEGIES, strategy_name_from_proto
from tests.server.merge.conftest import leftovers

PAIR = ["lora-qv", "lora-qvo8"]  # both r 8, different targets and alphas
WEIGHTS = [0.7, -0.4]


def _peft_combined(base_dir, root, ids, weights, strategy, seed=None, **kwargs):
    """PEFT's add_weighted_adapter on the same adapters: module name -> (A, B) of the new adapter.

    PEFT has no seed: DARE draws from the global RNG, after the new adapter's layers are initialised
    (which draws too). The global RNG is seeded at that point (PEFT calls ``_freeze_adapter`` between the
    two) so that the masks are drawn from the seed, as adapterd draws them."""
    import peft.tuners.lora.model as lora_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, root / ids[0], adapter_name="a0")
    for i, adapter_id in enumerate(ids[1:], 1):
        model.load_adapter(root / adapter_id, adapter_name=f"a{i}")
    original = lora_model._freeze_adapter

    def seeded_freeze(*args, **kw):
        original(*args, **kw)
        if seed is not None:
            torch.manual_seed(seed)

    lora_model._freeze_adapter = seeded_freeze
    try:
        model.add_weighted_adapter([f"a{i}" for i in range(len(ids))], weights, "new",
                                   combination_type=strategy, **kwargs)
    finally:
        lora_model._freeze_adapter = original
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "new" in module.lora_A:
            out[name] = (module.lora_A["new"].weight.detach(), module.lora_B["new"].weight.detach(),
                         module.scaling["new"])
    return out


def _ours(root, adapter_id):
    state = load_file(root / adapter_id / "adapter_model.safetensors")
    config = json.loads((root / adapter_id / "adapter_config.json").read_text())
    return state, config


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_matches_peft(merger, tiny_model_dir, merge_root, strategy):
    kwargs = {"density": 0.5, "majority_sign_method": "frequency"} if strategy in (
        "ties", "dare_linear", "dare_ties") else {}
    out_id = f"mixes/{strategy}"
    result = merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), out_id, strategy=strategy,
                                     seed=1234, overwrite=True, **kwargs)
    peft_new = _peft_combined(tiny_model_dir, merge_root, PAIR, WEIGHTS, strategy, seed=1234, **kwargs)
    state, config = _ours(merge_root, out_id)
    assert config["r"] == config["lora_alpha"] == result.rank
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "o_proj"}
    assert len(state) == 2 * len(peft_new)
    for name, (a, b, scaling) in peft_new.items():
        mine_a = state[f"base_model.model.{name}.lora_A.weight"]
        mine_b = state[f"base_model.model.{name}.lora_B.weight"]
        assert scaling == 1.0
        if strategy == "svd":  # singular vectors are defined up to sign: compare the delta they make
            torch.testing.assert_close(mine_b @ mine_a, b @ a, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(mine_a, a) and torch.equal(mine_b, b), name


def test_new_adapter_loads_in_peft_and_serves(merger, tiny_model_dir, merge_root):
    """The written adapter is a plain PEFT adapter whose delta equals the weighted PEFT combination."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/cat-loaded", strategy="cat",
                            overwrite=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, merge_root / "mixes" / "cat-loaded", adapter_name="new")
    for i, adapter_id in enumerate(PAIR):
        model.load_adapter(merge_root / adapter_id, adapter_name=f"a{i}")
    for _, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "new" in module.lora_A:
            want = sum(w * module.get_delta_weight(f"a{i}") for i, w in enumerate(WEIGHTS)
                       if f"a{i}" in module.lora_A)
            torch.testing.assert_close(module.get_delta_weight("new"), want, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_is_folded_not_doubled(merger, merge_root):
    """PEFT copies use_rslora into the new config with lora_alpha = r, scaling the result by sqrt(r); the
    factors match PEFT's but adapterd's config turns rsLoRA off so the delta is the intended one."""
    from adapterd.server.merge.lora import load_lora_adapter

    merger.merge_to_adapter([("lora-rs8", 1.0)], "mixes/rs-copy", strategy="linear", overwrite=True)
    _, config = _ours(merge_root, "mixes/rs-copy")
    assert config["use_rslora"] is False
    new = load_lora_adapter(merge_root / "mixes" / "rs-copy", "x", "f", "combined")
    old = load_lora_adapter(merge_root / "lora-rs8", "y", "f", "combined")
    for name, module in old.modules.items():
        torch.testing.assert_close(new.modules[name].delta(), module.delta(), atol=1e-6, rtol=1e-5)


def test_mismatched_ranks_are_refused(merger, merge_root):
    for strategy in ("linear", "ties", "dare_linear", "dare_ties"):
        with pytest.raises(FailedPrecondition, match="one rank") as err:
            merger.merge_to_adapter([("lora-qv", 1.0), ("team/lora-all", 1.0)], "mixes/bad",
                                    strategy=strategy, density=0.5)
        assert err.value.field == "adapters"
    assert not (merge_root / "mixes" / "bad").exists()
    # cat and svd accept different ranks: cat sums them, svd keeps the largest (or the one asked)
    assert merger.merge_to_adapter([("lora-qv", 1.0), ("team/lora-all", 1.0)], "mixes/cat-mixed",
                                   strategy="cat", overwrite=True).rank == 12
    assert merger.merge_to_adapter([("lora-qv", 1.0), ("team/lora-all", 1.0)], "mixes/svd-mixed",
                                   strategy="svd", rank=4, overwrite=True).rank == 4


def test_prefix_adapters_cannot_be_combined(merger):
    with pytest.raises(FailedPrecondition, match="PREFIX_TUNING") as err:
        merger.merge_to_adapter([("lora-qv", 1.0), ("prefix", 1.0)], "mixes/p")
    assert err.value.field == "adapters[1].adapter_id"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"strategy": "ties"}, "density"),
    ({"strategy": "dare_ties", "density": 1.5}, "density"),
    ({"strategy": "ties", "density": 0.5, "majority_sign_method": "most"}, "majority_sign_method"),
    ({"strategy": "nope"}, "strategy"),
    ({"strategy": "cat", "rank": 3}, "rank"),
    ({"strategy": "svd", "rank": 1000}, "rank"),
])
def test_bad_parameters(merger, merge_root, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/bad-params", **kwargs)
    assert err.value.field == field
    assert not (merge_root / "mixes" / "bad-params").exists()


def test_output_id_rules_and_overwrite(merger, merge_root):
    with pytest.raises(InvalidArgument) as err:
        merger.merge_to_adapter([("lora-qv", 1.0)], "../escape")
    assert err.value.field == "output_adapter_id"
    with pytest.raises(InvalidArgument, match="overlaps"):
        merger.merge_to_adapter([("lora-qv", 1.0)], "lora-qv", overwrite=True)
    merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/ow", strategy="linear")
    with pytest.raises(AlreadyExists):
        merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/ow", strategy="linear")
    merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/ow", strategy="cat", overwrite=True)
    assert _ours(merge_root, "mixes/ow")[1]["r"] == 16
    assert leftovers(merge_root / "mixes") == []


def test_dare_seed_reproducible_and_reported(merger, merge_root):
    pairs = list(zip(PAIR, WEIGHTS, strict=True))
    first = merger.merge_to_adapter(pairs, "mixes/d1", strategy="dare_linear", density=0.3, overwrite=True)
    again = merger.merge_to_adapter(pairs, "mixes/d2", strategy="dare_linear", density=0.3,
                                    seed=first.seed, overwrite=True)
    assert first.seed is not None and again.seed == first.seed
    s1, s2 = _ours(merge_root, "mixes/d1")[0], _ours(merge_root, "mixes/d2")[0]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cancelled_adapter_merge_leaves_nothing(merger, merge_root):
    def cancel(done, total, nbytes):
        if done == 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/cancelled", progress=cancel)
    assert not (merge_root / "mixes" / "cancelled").exists()


def test_proto_strategy_names_match_registry():
    from adapterd.v1 import adapterd_pb2

    for value in adapterd_pb2.MergeStrategy.values():
        name = adapterd_pb2.MergeStrategy.Name(value).lower()
        expected = "linear" if value == 0 else name
        assert strategy_name_from_proto(value) == expected and expected in STRATEGIES
    with pytest.raises(InvalidArgument):
        strategy_name_from_proto(99)


def test_cli_merge_to_adapter(tiny_model_dir, merge_root, capsys):
    from adapterd.cli import main

    rc = main(["merge", "--base", str(tiny_model_dir), "--adapter-root", str(merge_root), "lora-qv:0.7",
               "lora-qvo8:0.3", "--output-adapter", "mixes/cli", "--strategy", "dare_ties", "--density", "0.5",
               "--seed", "7", "--overwrite", "--no-progress"])
    assert rc == 0
    assert "seed 7" in capsys.readouterr().out
    assert (merge_root / "mixes" / "cli" / "adapter_config.json").is_file()


def test_new_adapter_is_served_at_once(merger, tiny_model_dir, merge_root):
    """The serving core's adapter store finds and loads the new adapter without a restart."""
    from transformers import AutoModelForCausalLM

    from adapterd.server.adapters.lora import linear_shapes
    from adapterd.server.adapters.store import AdapterStore, BaseShape

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = model.config
    store = AdapterStore(merge_root, BaseShape(
        linear_shapes=linear_shapes(model), num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        dtype=torch.float32, device=torch.device("cpu"), max_lora_rank=64))
    merger.merge_to_adapter(list(zip(PAIR, WEIGHTS, strict=True)), "mixes/served", strategy="svd", rank=4,
                            overwrite=True)
    loaded = store.get("mixes/served")
    assert loaded.type == "LORA" and loaded.rank == 4
    assert "mixes/served" in [r.adapter_id for r in store.list()]
