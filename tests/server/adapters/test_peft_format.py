"""``peft_format`` alone: PEFT's defaults, the one pairing rule, the one validation, and agreement with PEFT's
own loading on every config field the module accepts (the same directory loaded by both: scaling per module,
tensors, prefix key/values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterd.server.adapters.peft_format import (
    LoraConfig,
    PrefixConfig,
    describe_config,
    lora_modules,
    pair_lora_keys,
    read_adapter,
)
from adapterd.server.adapters.prefix import parse_prefix
from adapterd.server.errors import DataLoss, FailedPrecondition
from tests.helpers import _load_base, _randomize, make_prefix_adapter

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _save_lora(base_dir: Path, out: Path, seed: int = 0, **config) -> Path:
    """An adapter written by plain PEFT with ``config`` (PEFT's LoraConfig keywords), random factors."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(_load_base(base_dir), PeftLoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **config))
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def _edit_config(adapter: Path, **changes) -> None:
    """Rewrite the adapter's config: a value of None removes the key."""
    raw = json.loads((adapter / CONFIG).read_text())
    for key, value in changes.items():
        raw.pop(key) if value is None else raw.__setitem__(key, value)
    (adapter / CONFIG).write_text(json.dumps(raw))


def _peft_lora(base_dir: Path, adapter: Path) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """PEFT's own reading of the directory: module name -> (scaling, lora_A weight, lora_B weight)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(base_dir), adapter)
    return {name: (m.scaling["default"], m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _ours(adapter: Path):
    files = read_adapter(adapter.parent, adapter)
    return lora_modules(LoraConfig.from_dict(files.raw), files.tensors)


# Every LoRA config field the module accepts, each as PEFT writes it (None in `remove`: deleted from the
# config afterwards, so that PEFT's default applies on both sides).
LORA_CASES = {
    "r-alpha": (dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]), {}),
    "rslora": (dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"]), {}),
    "patterns": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 4, "model.layers.1.mlp.down_proj": 2},
                      alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 5}), {}),
    "regex-targets": (dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|up_proj)"), {}),
    "bias-all": (dict(r=4, lora_alpha=8, target_modules=["k_proj"], bias="all"), {}),
    "bias-lora-only": (dict(r=4, lora_alpha=8, target_modules=["k_proj"], bias="lora_only"), {}),
    "no-alpha": (dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]), {"lora_alpha": None}),
    "no-r": (dict(r=8, lora_alpha=4, target_modules=["v_proj"]), {"r": None}),
    "no-alpha-rslora": (dict(r=16, lora_alpha=4, use_rslora=True, target_modules=["gate_proj"]),
                        {"lora_alpha": None}),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_agrees_with_peft_on_scaling_and_tensors(tiny_model_dir, tmp_path, case):
    config, removed = LORA_CASES[case]
    adapter = _save_lora(tiny_model_dir, tmp_path / case, **config)
    _edit_config(adapter, **removed)
    peft, ours = _peft_lora(tiny_model_dir, adapter), _ours(adapter)
    assert sorted(ours) == sorted(peft) and ours
    for name, (scaling, a, b) in peft.items():
        assert ours[name].scaling == pytest.approx(scaling, rel=1e-12), name
        assert torch.equal(ours[name].a, a) and torch.equal(ours[name].b, b), name


def test_defaults_are_peft_defaults():
    from peft import LoraConfig as PeftLoraConfig

    peft, ours = PeftLoraConfig(), LoraConfig.from_dict({"peft_type": "LORA"})
    for name in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "fan_in_fan_out", "bias"):
        assert getattr(ours, name) == getattr(peft, name), name
    assert describe_config({"peft_type": "LORA"}).rank == 8


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_agrees_with_peft_on_config_and_key_values(tiny_model_dir, tmp_path, projection):
    from peft import PeftModel

    adapter = make_prefix_adapter(tiny_model_dir, tmp_path / "prefix", num_virtual_tokens=5, projection=projection)
    model = PeftModel.from_pretrained(_load_base(tiny_model_dir), adapter)
    peft_config = model.peft_config["default"]
    files = read_adapter(tmp_path, adapter)
    ours = PrefixConfig.from_dict(files.raw)
    for name in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                 "num_transformer_submodules", "encoder_hidden_size", "prefix_projection"):
        assert getattr(ours, name) == getattr(peft_config, name), name
    heads = model.base_model.config.num_key_value_heads
    weights = parse_prefix(ours, files.tensors, ours.num_layers, heads, ours.token_dim // ours.num_attention_heads)
    cache = model.get_prompt(batch_size=1)
    for layer in range(ours.num_layers):
        torch.testing.assert_close(weights.keys[layer], cache.layers[layer].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(weights.values[layer], cache.layers[layer].values[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- the one pairing rule

A, B = torch.ones(2, 6), torch.ones(4, 2)


@pytest.mark.parametrize("spelling", ["base_model.model.m.layers.0.q_proj.lora_{}.weight",
                                      "base_model.model.m.layers.0.q_proj.lora_{}.default.weight",
                                      "m.layers.0.q_proj.lora_{}.weight"])
def test_every_key_spelling_peft_writes_pairs_to_the_same_module(spelling):
    tensors = {spelling.format("A"): A, spelling.format("B"): B}
    assert pair_lora_keys(tensors) == {"m.layers.0.q_proj": (spelling.format("A"), spelling.format("B"))}


@pytest.mark.parametrize("key", ["base_model.model.embed_tokens.lora_embedding_A",
                                 "base_model.model.m.q_proj.lora_magnitude_vector",
                                 "base_model.model.m.q_proj.lora_B.bias",
                                 "base_model.model.m.q_proj.base_layer.bias",
                                 "base_model.model.lm_head.modules_to_save.weight"])
def test_tensors_that_are_not_lora_factors_are_refused_by_name(key):
    tensors = {"base_model.model.m.q_proj.lora_A.weight": A, "base_model.model.m.q_proj.lora_B.weight": B,
               key: torch.ones(3)}
    with pytest.raises(FailedPrecondition, match="unexpected tensor") as err:
        pair_lora_keys(tensors)
    assert key in err.value.message


def test_a_module_without_its_b_is_refused():
    with pytest.raises(FailedPrecondition, match="lacks its lora_A or lora_B"):
        pair_lora_keys({"base_model.model.m.q_proj.lora_A.weight": A})


# ------------------------------------------------------------------------------------- the one validation

def _pair(a: torch.Tensor = A, b: torch.Tensor = B) -> dict[str, torch.Tensor]:
    return {"base_model.model.m.lora_A.weight": a, "base_model.model.m.lora_B.weight": b}


@pytest.mark.parametrize("raw,tensors,words", [
    ({"r": 2}, _pair(b=torch.ones(4, 3)), "not (r, in) and (out, r)"),
    ({"r": 2}, _pair(a=torch.ones(2, 6, 1)), "not (r, in) and (out, r)"),
    ({"r": 4}, _pair(), "rank 2 of 'm' differs from the config's 4"),
    ({"r": 4, "rank_pattern": {"m": 2}}, _pair(), None),  # rank_pattern decides the module's rank
    ({"r": 2}, _pair(a=torch.tensor([[1.0] * 6, [float("nan")] * 6])), "base_model.model.m.lora_A.weight holds NaN"),
    ({"r": 2}, _pair(b=torch.full((4, 2), float("-inf"))), "lora_B.weight holds an infinite value"),
    ({"r": 2, "lora_alpha": float("inf")}, _pair(), "non-finite scaling"),
])
def test_shapes_ranks_and_values_are_checked_once_for_everyone(raw, tensors, words):
    config = LoraConfig.from_dict({"peft_type": "LORA", **raw})
    if words is None:
        assert lora_modules(config, tensors)["m"].rank == 2
        return
    with pytest.raises(FailedPrecondition) as err:
        lora_modules(config, tensors)
    assert words in err.value.message


@pytest.mark.parametrize("raw,field", [
    ({"r": "eight"}, "r"), ({"r": 0}, "r"), ({"r": True}, "r"), ({"lora_alpha": "8"}, "lora_alpha"),
    ({"use_rslora": "yes"}, "use_rslora"), ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"bias": "some"}, "bias"), ({"target_modules": 3}, "target_modules"), ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
])
def test_config_fields_of_the_wrong_type_are_refused_naming_the_field(raw, field):
    with pytest.raises(FailedPrecondition) as err:
        LoraConfig.from_dict({"peft_type": "LORA", **raw})
    assert field in err.value.message


@pytest.mark.parametrize("raw,words", [
    ({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "bias on B"), ({"modules_to_save": ["lm_head"]},
                                                                          "modules_to_save"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
])
def test_lora_variants_no_consumer_supports_are_refused_with_a_reason(raw, words):
    with pytest.raises(FailedPrecondition, match=words):
        LoraConfig.from_dict({"peft_type": "LORA", **raw})


def test_prefix_rows_must_match_num_virtual_tokens():
    config = PrefixConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    with pytest.raises(FailedPrecondition, match="3 rows for num_virtual_tokens 4"):
        parse_prefix(config, {"prompt_embeddings": torch.zeros(3, 2 * 2 * 4)}, 1, 2, 2)
    with pytest.raises(FailedPrecondition, match="num_virtual_tokens is missing"):
        PrefixConfig.from_dict({"peft_type": "PREFIX_TUNING"})


# ------------------------------------------------------------------------------------- files: safetensors only

def test_a_bin_only_adapter_is_refused_naming_the_file_and_never_unpickled(adapter_root, tmp_path, monkeypatch):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / CONFIG).write_text((adapter_root / "lora-qv" / CONFIG).read_text())
    torch.save(load_file(adapter_root / "lora-qv" / WEIGHTS), adapter / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(FailedPrecondition, match="adapter_model.bin") as err:
        read_adapter(tmp_path, adapter)
    assert str(tmp_path) not in str(err.value)


def test_a_missing_weights_file_is_data_loss(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONFIG).write_text('{"peft_type": "LORA"}')
    with pytest.raises(DataLoss, match=WEIGHTS):
        read_adapter(tmp_path, tmp_path / "a")


def test_a_file_read_whole_is_checked_in_one_reduction_and_still_names_the_culprit(tmp_path):
    """Tensors read from one file share one buffer: one reduction covers them all; a NaN in any of them is
    still reported under its own name."""
    tensors = {f"base_model.model.l{i}.lora_{w}.weight": torch.ones(2, 6) if w == "A" else torch.ones(4, 2)
               for i in range(3) for w in "AB"}
    tensors["base_model.model.l2.lora_B.weight"][1, 1] = float("nan")
    (tmp_path / "a").mkdir()
    save_file(tensors, tmp_path / "a" / WEIGHTS)
    (tmp_path / "a" / CONFIG).write_text('{"peft_type": "LORA", "r": 2}')
    files = read_adapter(tmp_path, tmp_path / "a")
    with pytest.raises(FailedPrecondition, match=r"^base_model\.model\.l2\.lora_B\.weight holds NaN$"):
        lora_modules(LoraConfig.from_dict(files.raw), files.tensors)


def test_check_adapter_reads_both_types_as_consumers_do(adapter_root, tmp_path):
    from adapterd.server.adapters.peft_format import check_adapter

    check_adapter(read_adapter(adapter_root, adapter_root / "lora-qv"))
    check_adapter(read_adapter(adapter_root, adapter_root / "prefix"))
    (tmp_path / CONFIG).write_text('{"peft_type": "IA3"}')
    save_file({"x": torch.ones(1)}, tmp_path / WEIGHTS)
    with pytest.raises(FailedPrecondition, match="'IA3' is not one adapterd reads"):
        check_adapter(read_adapter(tmp_path, tmp_path))
