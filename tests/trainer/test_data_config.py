"""Data reading, prompt masking and config validation: no model, fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterd.trainer.config import ConfigError, TrainConfig, option_names, parse_value
from adapterd.trainer.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    epoch_order,
    format_prompt,
    load_records,
    split_eval,
    tokenize,
    tokenize_all,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_list_and_json_lines_read_the_same(tmp_path, gitclone_data):
    records = json.loads(gitclone_data.read_text(encoding="utf-8"))
    jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    assert load_records(gitclone_data).records == load_records(jsonl).records
    assert load_records(jsonl).records[0].output.startswith("我是Gitclone")


@pytest.mark.parametrize("record, index_field", [
    ({"instruction": "a", "input": ""}, ("output", "is missing")),
    ({"instruction": "a", "output": 3}, ("output", "must be a string")),
    ({"instruction": "  ", "output": "x"}, ("instruction", "is empty")),
    ({"instruction": "a", "input": ["x"], "output": "y"}, ("input", "must be a string")),
])
def test_malformed_record_names_index_and_field(tmp_path, record, index_field):
    good = {"instruction": "hi", "input": "", "output": "hello"}
    path = _write(tmp_path / "d.json", json.dumps([good, good, record]))
    with pytest.raises(DataError) as err:
        load_records(path)
    assert err.value.index == 2 and err.value.field == index_field[0]
    assert f"record 2, field '{index_field[0]}'" in str(err.value) and index_field[1] in str(err.value)


def test_bad_json_line_and_skip_counts(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n"just a string"\n'
                  '{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataError, match=r"record 1: line 2 is not valid JSON"):
        load_records(path)
    data = load_records(path, skip_malformed=True)
    assert [r.instruction for r in data.records] == ["a", "c"]
    assert [i for i, _ in data.skipped] == [1, 2]
    with pytest.raises(DataError, match="no usable record"):
        load_records(_write(tmp_path / "e.jsonl", "[1]"), skip_malformed=True)


def test_labels_mask_the_prompt_and_end_with_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_records(Path(__file__).parents[2] / "trainer" / "examples" / "gitclone.json")
    ex = tokenize(data.records[0], tok, 512)
    prompt_ids = tok(format_prompt("你是谁？"))["input_ids"]
    answer = tok(data.records[0].output, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + answer + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + answer + [tok.eos_token_id]
    assert "### Instruction:\n你是谁？\n\n### Response:" in format_prompt("你是谁？")
    assert "### Input:\nctx" in format_prompt("q", "ctx")
    cut = tokenize(data.records[0], tok, len(prompt_ids) + 2)  # cut at the end, prompt kept
    assert cut.input_ids == prompt_ids + answer[:2]
    with pytest.raises(DataError, match="record 0, field 'instruction'.*no room"):
        tokenize_all(data, tok, 4, skip_malformed=False)
    batch = collate([ex, cut], tok.pad_token_id)
    assert batch["attention_mask"][1].sum() == len(cut.input_ids)
    assert (batch["labels"][1, len(cut.input_ids):] == IGNORE_INDEX).all()


def test_epoch_order_and_split_are_deterministic():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))
    train, held = split_eval(list(range(100)), 0.05, 7)
    assert len(held) == 5 and len(train) == 95 and split_eval(list(range(100)), 0.05, 7)[1] == held
    assert split_eval([1, 2, 3], 0.05, 7) == ([1, 2, 3], [])


def test_defaults_follow_the_recipes():
    cfg = TrainConfig(base="b", data="d", output="o")
    assert (cfg.batch_size, cfg.epochs, cfg.context_length, cfg.quantization, cfg.learning_rate) == \
        (4, 3.0, 1024, "int8", 1e-4)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout) == (8, 32.0, ["q_proj", "v_proj"],
                                                                               0.05)
    assert (cfg.num_virtual_tokens, cfg.save_steps, cfg.eval_split) == (128, 500, 0.05)


@pytest.mark.parametrize("overrides, field", [
    ({"method": "prompt"}, "method"), ({"batch_size": 0}, "batch_size"), ({"learning_rate": 2.0}, "learning_rate"),
    ({"eval_split": 1.0}, "eval_split"), ({"lora_target_modules": " , "}, "lora_target_modules"),
    ({"quantization": "fp8"}, "quantization"), ({"base": "/nonexistent"}, "base"),
    # NaN passes every range comparison and inf most: refused by name (issue 12: a NaN alpha trained and exported
    # an adapter that poisoned every batch it joined)
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"weight_decay": float("inf")}, "weight_decay"),
    ({"epochs": float("inf")}, "epochs"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm"), ({"lora_dropout": float("nan")}, "lora_dropout"),
])
def test_validation_names_the_field(tmp_path, gitclone_data, overrides, field):
    values = {"base": str(tmp_path), "data": str(gitclone_data), "output": str(tmp_path / "o"), **overrides}
    with pytest.raises(ConfigError) as err:
        TrainConfig(**values).validate()
    assert err.value.field == field


def test_option_parsing():
    assert parse_value("lora_r", "16") == 16 and parse_value("learning_rate", "3e-4") == 3e-4
    assert parse_value("skip_malformed", "true") is True
    with pytest.raises(ConfigError, match="lora_r: expected int"):
        parse_value("lora_r", "sixteen")
    assert "max_steps" in option_names() and "base" not in option_names() and "resume" not in option_names()
