"""Merging adapters into full weights: equal to PEFT's merge_and_unload, same greedy tokens, atomic output."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adapterd.server.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from adapterd.server.merge import Merger
from tests.helpers import reference_greedy
from tests.server.merge.conftest import leftovers

PROMPT = "Below is an instruction that describes a task."


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft_reference(base_dir, adapter_dirs_weights):
    """Base weights + sum_i w_i * PEFT's own delta (merge_and_unload for one adapter of weight 1)."""
    from peft import PeftModel

    if len(adapter_dirs_weights) == 1 and adapter_dirs_weights[0][1] == 1.0:
        return PeftModel.from_pretrained(_load(base_dir), adapter_dirs_weights[0][0]).merge_and_unload().state_dict()
    state = {k: v.clone() for k, v in _load(base_dir).state_dict().items()}
    for adapter_dir, weight in adapter_dirs_weights:
        peft_model = PeftModel.from_pretrained(_load(base_dir), adapter_dir)
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                state[f"{name}.weight"] += weight * module.get_delta_weight("default")
    return state


def _assert_weights_close(model_dir, reference):
    merged = _load(model_dir).state_dict()
    assert set(merged) == set(reference)
    worst = max((merged[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("adapter_id", ["lora-qv", "team/lora-all", "lora-rs"])
def test_merge_matches_peft_and_greedy(merger, tiny_model_dir, merge_root, tmp_path, adapter_id):
    seen = []
    result = merger.merge_to_model([(adapter_id, 1.0)], tmp_path / "out",
                                   progress=lambda d, t, b: seen.append((d, t, b)))
    out = tmp_path / "out"
    _assert_weights_close(out, _peft_reference(tiny_model_dir, [(merge_root / adapter_id, 1.0)]))
    assert reference_greedy(out, PROMPT, None, 8) == reference_greedy(tiny_model_dir, PROMPT,
                                                                          merge_root / adapter_id, 8)
    # a plain HF directory: config, generation config, tokenizer, shards + index, nothing hidden left
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert leftovers(tmp_path) == []
    assert seen[0] == (0, result.tensors_total, 0) and seen[-1][0] == result.tensors_total
    assert [d for d, _, _ in seen] == list(range(result.tensors_total + 1))
    assert seen[-1][2] <= result.bytes_written and result.tensors_merged > 0


@pytest.mark.parametrize("chunk_bytes", [1000, 16 * 1024**2])  # blocks of 3 rows; whole tensors
def test_weighted_sum_of_two_adapters(tiny_model_dir, merge_root, tmp_path, chunk_bytes):
    pairs = [("lora-qv", 0.7), ("team/lora-all", -0.3)]
    Merger(tiny_model_dir, merge_root, copy_chunk_bytes=chunk_bytes).merge_to_model(pairs, tmp_path / "out")
    _assert_weights_close(tmp_path / "out", _peft_reference(tiny_model_dir,
                                                            [(merge_root / a, w) for a, w in pairs]))


def test_sharded_base_single_file_output(sharded_model_dir, tiny_model_dir, merge_root, tmp_path):
    merger = Merger(sharded_model_dir, merge_root)  # default shard budget: one output file
    merger.merge_to_model([("lora-qv", 1.0)], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    _assert_weights_close(tmp_path / "out", _peft_reference(tiny_model_dir, [(merge_root / "lora-qv", 1.0)]))


def test_bf16_base_is_merged_in_fp32_and_kept_bf16(tiny_model_dir, merge_root, tmp_path):
    from safetensors import safe_open

    bf16_dir = tmp_path / "bf16"
    _load(tiny_model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    Merger(bf16_dir, merge_root).merge_to_model([("lora-qv", 1.0)], tmp_path / "out")
    ref = _peft_reference(tiny_model_dir, [(merge_root / "lora-qv", 1.0)])
    base = _load(tiny_model_dir).state_dict()
    mismatched = total = 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        for name in f.keys():
            got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16
            # fp32 arithmetic, one rounding at the end; bf16 arithmetic would round B @ A and the sum too
            want = (base[name].to(torch.bfloat16).float() + (ref[name] - base[name])).to(torch.bfloat16)
            mismatched += int((got != want).sum())
            total += got.numel()
    assert mismatched <= total * 1e-3, (mismatched, total)


@pytest.mark.parametrize("adapter_id", ["prefix", "prefix-proj"])
def test_prefix_adapters_are_refused(merger, tmp_path, adapter_id):
    with pytest.raises(FailedPrecondition, match="cannot be folded into the base weights") as err:
        merger.merge_to_model([("lora-qv", 1.0), (adapter_id, 1.0)], tmp_path / "out")
    assert err.value.field == "adapters[1].adapter_id"
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_ids_and_missing_adapters(merger, tmp_path):
    with pytest.raises(InvalidArgument) as err:
        merger.merge_to_model([("lora-qv", 1.0), ("../etc", 1.0)], tmp_path / "out")
    assert err.value.field == "adapters[1].adapter_id"
    with pytest.raises(NotFound):
        merger.merge_to_model([("nope", 1.0)], tmp_path / "out")
    with pytest.raises(InvalidArgument, match="at least one"):
        merger.merge_to_model([], tmp_path / "out")
    with pytest.raises(InvalidArgument) as err:
        merger.merge_to_model([("lora-qv", float("nan"))], tmp_path / "out")
    assert err.value.field == "adapters[0].weight"


def test_output_may_not_overlap_base_or_root(merger, tiny_model_dir, merge_root):
    for bad in (tiny_model_dir, tiny_model_dir / "sub", tiny_model_dir.parent, merge_root / "m"):
        with pytest.raises(InvalidArgument) as err:
            merger.merge_to_model([("lora-qv", 1.0)], bad, overwrite=True)
        assert err.value.field == "output_model_dir"


def test_output_root_confines_outputs(tiny_model_dir, merge_root, tmp_path):
    merger = Merger(tiny_model_dir, merge_root, output_root=tmp_path / "outputs")
    with pytest.raises(InvalidArgument, match="not inside"):
        merger.merge_to_model([("lora-qv", 1.0)], "../elsewhere")
    result = merger.merge_to_model([("lora-qv", 1.0)], "m1")
    assert result.output == str((tmp_path / "outputs" / "m1").resolve())


def test_adapter_for_another_base_is_refused(merge_root, tmp_path):
    from adapterd.server.merge.synthetic import LlamaShape, write_random_llama

    other = tmp_path / "other-base"
    write_random_llama(other, LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(FailedPrecondition, match="another base"):
        Merger(other, merge_root).merge_to_model([("lora-qv", 1.0)], tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_corrupt_adapter_is_data_loss(merger, merge_root, tmp_path):
    import shutil

    bad = merge_root / "corrupt"
    shutil.copytree(merge_root / "lora-qv", bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    try:
        with pytest.raises(DataLoss):
            merger.merge_to_model([("corrupt", 1.0)], tmp_path / "out")
    finally:
        shutil.rmtree(bad)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_merge_leaves_nothing(merger, tmp_path):
    def cancel(done, total, nbytes):
        if done == total // 2:
            raise KeyboardInterrupt  # what a cancelled RPC or Ctrl-C raises midway

    with pytest.raises(KeyboardInterrupt):
        merger.merge_to_model([("lora-qv", 1.0)], tmp_path / "out", progress=cancel)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_full_midway_leaves_nothing(merger, tmp_path, monkeypatch):
    import errno

    from adapterd.server import safetensors_io as st_io
    from adapterd.server.errors import ResourceExhausted

    calls = {"n": 0}
    original = st_io.ShardWriter.copy_entry

    def failing(self, entry, chunk_bytes=st_io.COPY_CHUNK_BYTES):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, entry, chunk_bytes)

    monkeypatch.setattr(st_io.ShardWriter, "copy_entry", failing)
    with pytest.raises(ResourceExhausted, match="disk full"):
        merger.merge_to_model([("lora-qv", 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overwrite_semantics(merger, tmp_path):
    out = tmp_path / "out"
    merger.merge_to_model([("lora-qv", 1.0)], out)
    with pytest.raises(AlreadyExists) as err:
        merger.merge_to_model([("team/lora-all", 1.0)], out)
    assert err.value.field == "output_model_dir"
    merger.merge_to_model([("team/lora-all", 1.0)], out, overwrite=True)
    note = json.loads((out / "adapterd_merge.json").read_text())
    assert [a["adapter_id"] for a in note["adapters"]] == ["team/lora-all"]
    assert leftovers(tmp_path) == []
    # overwrite never replaces a directory that does not look like a model
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FailedPrecondition, match="refusing"):
        merger.merge_to_model([("lora-qv", 1.0)], tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_cli_merge_to_model(tiny_model_dir, merge_root, tmp_path, capsys):
    from adapterd.cli import main

    rc = main(["merge", "--base", str(tiny_model_dir), "--adapter-root", str(merge_root), "lora-qv:0.5",
               "--output-dir", str(tmp_path / "cli-out"), "--max-shard-size", "300KB"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote model" in capsys.readouterr().out
    assert (tmp_path / "cli-out" / "model.safetensors.index.json").is_file()
    rc = main(["merge", "--base", str(tiny_model_dir), "--adapter-root", str(merge_root), "prefix",
               "--output-dir", str(tmp_path / "cli-out2"), "--no-progress"])
    assert rc == 1 and "FAILED_PRECONDITION" in capsys.readouterr().err


def test_rank_and_alpha_patterns(tiny_model_dir, merge_root, tmp_path):
    from tests.helpers import make_lora_adapter

    root = tmp_path / "root"
    make_lora_adapter(tiny_model_dir, root / "patterned", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"],
                      seed=21, rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    Merger(tiny_model_dir, root).merge_to_model([("patterned", 1.0)], tmp_path / "out")
    _assert_weights_close(tmp_path / "out", _peft_reference(tiny_model_dir, [(root / "patterned", 1.0)]))


def test_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): PEFT's fan_in_fan_out adapters add (B @ A).T."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base_dir, root = tmp_path / "gpt2", tmp_path / "root"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        base_dir)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                           fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(root / "gpt2-lora")
    # small blocks: fan_in_fan_out rows are input features, sliced from A.T
    Merger(base_dir, root, copy_chunk_bytes=500).merge_to_model([("gpt2-lora", 1.0)], tmp_path / "out")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    reference = peft_model.merge_and_unload().state_dict()
    assert max((merged[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5
