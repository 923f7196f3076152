"""The template examples are trained with travels with the adapter: every checkpoint and export holds the
tokenizer with it as its chat template, which renders a user message exactly as training formatted it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterd.trainer.checkpoint import list_checkpoints
from adapterd.trainer.data import format_prompt
from adapterd.trainer.loop import train
from adapterd.trainer.template import alpaca_chat_template


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("bos", [False, True])
def test_a_user_message_renders_to_the_training_prompt_tokens(tokenizer, gitclone_data, bos):
    """Rendered and tokenized as chat prompts are (no special tokens added), a user message gives exactly the
    prompt tokens of training (``tokenizer(format_prompt(...))``), with a tokenizer that adds BOS and one
    that does not."""
    tokenizer.add_bos_token = bos
    assert (tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id) is bos
    template = alpaca_chat_template(tokenizer)
    for record in json.loads(gitclone_data.read_text(encoding="utf-8")):
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}],
                                             chat_template=template, tokenize=False, add_generation_prompt=True)
        assert text.removeprefix(tokenizer.bos_token if bos else "") == format_prompt(record["instruction"])
        assert (tokenizer(text, add_special_tokens=False)["input_ids"]
                == tokenizer(format_prompt(record["instruction"]))["input_ids"])


def test_a_system_message_replaces_the_header(tokenizer):
    template = alpaca_chat_template(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "You are Gitclone."},
                                          {"role": "user", "content": "Hi"}], chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
    assert text == "You are Gitclone.\n\n### Instruction:\nHi\n\n### Response:"


def test_checkpoints_and_exports_carry_the_template_and_load_in_plain_peft(make_config, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "adapters" / "gitclone"
    cfg = make_config(max_steps=2, save_steps=1, export_adapter=str(target))
    train(cfg)
    checkpoints = list_checkpoints(Path(cfg.output))
    assert checkpoints and all((path / "chat_template.jinja").is_file() for _, path in checkpoints)
    assert (target / "chat_template.jinja").is_file() and (target / "adapter_model.safetensors").is_file()
    assert not (target / "trainer_state.pt").exists() and not (target / "trainer_state.json").exists()
    tok = AutoTokenizer.from_pretrained(target)
    rendered = tok.apply_chat_template([{"role": "user", "content": "你是谁？"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == format_prompt("你是谁？")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, target)
    assert any("lora_A" in name for name, _ in model.named_parameters())
