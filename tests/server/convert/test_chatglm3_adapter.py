"""``adapterd convert chatglm3-adapter``: finetune_demo's P-Tuning v2 prefix encoder and its PEFT LoRA on the
fused ``query_key_value`` become PEFT adapters for the converted base whose logits, through PEFT itself, equal
the reference forward of ChatGLM3 with that prefix (prompt positions from 0) or that LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from adapterd.server.convert.chatglm3_adapter import convert_chatglm3_adapter
from adapterd.server.model import cache_kwarg
from tests.server.convert.chatglm3_fixture import (
    SPECIAL,
    reference_logits,
    write_lora_checkpoint,
    write_prefix_checkpoint,
)


def prefix_table(tiny, virtual: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    width = tiny.num_layers * 2 * tiny.multi_query_group_num * tiny.kv_channels
    return torch.randn(virtual, width, generator=gen) * 0.5


def prompt_ids(chatglm3, text="你是谁？我是Gitclone，一个语言模型。hello world") -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(chatglm3.src / "tokenizer.model"))
    n = sp.vocab_size()
    return [n + SPECIAL.index("[gMASK]"), n + SPECIAL.index("sop"), *sp.encode(text)]


@torch.no_grad()
def peft_logits(base_dir, adapter_dir, ids: list[int]) -> torch.Tensor:
    """PEFT's own model; for a prefix, PEFT's get_prompt() as the past and positions after it, as PEFT counts."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    x = torch.tensor([ids])
    config = PeftConfig.from_pretrained(adapter_dir)
    if config.peft_type != "PREFIX_TUNING":
        return peft_model(input_ids=x).logits[0]
    v = config.num_virtual_tokens
    return model(input_ids=x, attention_mask=torch.ones(1, v + len(ids), dtype=torch.long),
                 position_ids=torch.arange(v, v + len(ids))[None], use_cache=True,
                 **{cache_kwarg(model): peft_model.get_prompt(batch_size=1)}).logits[0]


@pytest.mark.parametrize("layout", ["prefix-only-bin", "full-safetensors"])
def test_ptuning_v2_prefix_equals_chatglm3s(chatglm3, tmp_path, layout):
    table = prefix_table(chatglm3.tiny, 5, seed=7)
    full = layout.startswith("full")
    src = write_prefix_checkpoint(tmp_path / "ckpt", chatglm3.tiny, table, chatglm3.weights if full else None,
                                  fmt="safetensors" if full else "bin")
    done = convert_chatglm3_adapter(src, tmp_path / "prefix", chatglm3.dst)
    assert done.kind == "PREFIX_TUNING"
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["prefix_projection"]) == (
        "PREFIX_TUNING", 5, False)
    ids = prompt_ids(chatglm3)
    want = reference_logits(chatglm3.weights, chatglm3.tiny, ids, prefix=table)
    torch.testing.assert_close(peft_logits(chatglm3.dst, tmp_path / "prefix", ids), want, atol=5e-5, rtol=1e-5)
    # the prefix matters, and its keys' turn is what makes PEFT's positions agree with ChatGLM3's
    assert not torch.allclose(want, reference_logits(chatglm3.weights, chatglm3.tiny, ids), atol=1e-2)


def test_a_projected_prefix_is_applied_once(chatglm3, tmp_path):
    """finetune_demo with prefix_projection: the MLP's output is the table PEFT serves."""
    tiny, h = chatglm3.tiny, chatglm3.tiny.hidden_size
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(4, tiny.num_layers * 2 * tiny.multi_query_group_num * tiny.kv_channels, generator=gen)
    trans = {"transformer.prefix_encoder.trans.0.weight": torch.randn(h, emb.shape[1], generator=gen) * 0.1,
             "transformer.prefix_encoder.trans.0.bias": torch.randn(h, generator=gen) * 0.1,
             "transformer.prefix_encoder.trans.2.weight": torch.randn(emb.shape[1], h, generator=gen) * 0.5,
             "transformer.prefix_encoder.trans.2.bias": torch.randn(emb.shape[1], generator=gen) * 0.1}
    src = write_prefix_checkpoint(tmp_path / "ckpt", tiny, emb, trans)
    convert_chatglm3_adapter(src, tmp_path / "prefix", chatglm3.dst)
    table = torch.tanh(emb @ trans["transformer.prefix_encoder.trans.0.weight"].T
                       + trans["transformer.prefix_encoder.trans.0.bias"])
    table = (table @ trans["transformer.prefix_encoder.trans.2.weight"].T
             + trans["transformer.prefix_encoder.trans.2.bias"])
    ids = prompt_ids(chatglm3)
    torch.testing.assert_close(peft_logits(chatglm3.dst, tmp_path / "prefix", ids),
                               reference_logits(chatglm3.weights, tiny, ids, prefix=table), atol=5e-5, rtol=1e-5)


def test_lora_on_query_key_value_splits_exactly(chatglm3, tmp_path):
    src, deltas = write_lora_checkpoint(tmp_path / "lora-src", chatglm3.tiny, r=4, alpha=16, seed=5)
    done = convert_chatglm3_adapter(src, tmp_path / "lora", chatglm3.dst)
    assert done.kind == "LORA"
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["k_proj", "q_proj", "v_proj"], 4, 16)
    ids = prompt_ids(chatglm3)
    want = reference_logits(chatglm3.weights, chatglm3.tiny, ids, qkv_delta=deltas)
    torch.testing.assert_close(peft_logits(chatglm3.dst, tmp_path / "lora", ids), want, atol=5e-5, rtol=1e-5)
    assert not torch.allclose(want, reference_logits(chatglm3.weights, chatglm3.tiny, ids), atol=1e-2)
