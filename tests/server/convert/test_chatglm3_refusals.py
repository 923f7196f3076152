"""Malformed sources are refused before anything is written, with a message naming the tensor or file, and
nothing is left at DST (nor a temporary directory beside it), whatever fails and whenever."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from adapterd.server.convert.chatglm3 import convert_chatglm3
from adapterd.server.convert.chatglm3_adapter import convert_chatglm3_adapter
from adapterd.server.errors import AdapterdError, FailedPrecondition
from tests.helpers import CLI, ENV
from tests.server.convert.chatglm3_fixture import write_checkpoint, write_lora_checkpoint, write_prefix_checkpoint

LAYER1 = "transformer.encoder.layers.1."


class RunsCode:
    """A pickle that runs a shell command when loaded (what weights_only=True must refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _source(chatglm3, tmp_path, change) -> object:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(chatglm3.src / "tokenizer.model", src)
    weights = dict(chatglm3.weights)
    change(weights)
    write_checkpoint(src, chatglm3.tiny, weights)
    return src


def _nothing_left(tmp_path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")], "a temporary directory was left"


@pytest.mark.parametrize("change, named", [
    (lambda w: w.pop(LAYER1 + "self_attention.dense.weight"), LAYER1 + "self_attention.dense.weight"),
    (lambda w: w.update({LAYER1 + "mlp.dense_h_to_4h.weight": torch.zeros(10, 64)}), LAYER1 + "mlp.dense_h_to_4h"),
    (lambda w: w.update({LAYER1 + "self_attention.query_key_value.bias": torch.zeros(128, dtype=torch.int32)}),
     "query_key_value.bias is I32"),
    (lambda w: w.update({"transformer.encoder.layers.7.mlp.extra.weight": torch.zeros(2)}), "layers.7.mlp.extra"),
])
def test_a_malformed_base_is_refused_naming_the_tensor(chatglm3, tmp_path, change, named):
    src = _source(chatglm3, tmp_path, change)
    with pytest.raises(FailedPrecondition, match=named.replace(".", r"\.")):
        convert_chatglm3(src, tmp_path / "out")
    _nothing_left(tmp_path)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(chatglm3, tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, chatglm3.tiny, chatglm3.weights, fmt="bin")
    shutil.copy(chatglm3.src / "tokenizer.model", src)
    marker = tmp_path / "pwned"
    torch.save({"transformer.output_layer.weight": RunsCode(marker)}, src / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(FailedPrecondition, match="pytorch_model-00002-of-00002.bin was refused.*GLOBAL posix.system"):
        convert_chatglm3(src, tmp_path / "out")
    assert not marker.exists()
    _nothing_left(tmp_path)


def test_a_failure_while_writing_leaves_nothing(chatglm3, tmp_path, monkeypatch):
    from adapterd.server.convert.checkpoint import SourceCheckpoint

    real, calls = SourceCheckpoint.rows, []

    def failing(self, name, *args):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk gone")
        return real(self, name, *args)

    monkeypatch.setattr(SourceCheckpoint, "rows", failing)
    with pytest.raises(OSError):
        convert_chatglm3(chatglm3.src, tmp_path / "out")
    _nothing_left(tmp_path)


def test_missing_files_and_wrong_configs_are_named(chatglm3, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(chatglm3.src, src)
    (src / "tokenizer.model").unlink()
    with pytest.raises(AdapterdError, match="tokenizer.model is missing"):
        convert_chatglm3(src, tmp_path / "out")
    _nothing_left(tmp_path)
    (src / "config.json").write_text('{"model_type": "chatglm", "rmsnorm": false}')
    with pytest.raises(FailedPrecondition, match="rmsnorm"):
        convert_chatglm3(src, tmp_path / "out")
    (src / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FailedPrecondition, match="model_type 'llama'"):
        convert_chatglm3(src, tmp_path / "out")
    _nothing_left(tmp_path)


def test_adapters_for_another_shape_are_refused(chatglm3, tmp_path):
    tiny = chatglm3.tiny
    prefix = write_prefix_checkpoint(tmp_path / "pt", tiny, torch.zeros(4, 10))
    with pytest.raises(FailedPrecondition, match="prefix_encoder.embedding.weight has 10 columns"):
        convert_chatglm3_adapter(prefix, tmp_path / "out", chatglm3.dst)
    lora, _ = write_lora_checkpoint(tmp_path / "lora", tiny, r=4, alpha=8, seed=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora / "adapter_model.safetensors")
    key = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(FailedPrecondition, match=f"{key} has shape"):
        convert_chatglm3_adapter(lora, tmp_path / "out", chatglm3.dst)
    _nothing_left(tmp_path)


def test_the_command_line_says_one_line_and_exits_1(chatglm3, tmp_path):
    src = _source(chatglm3, tmp_path, lambda w: w.pop("transformer.output_layer.weight"))
    done = subprocess.run([*CLI, "convert", "chatglm3", str(src), str(tmp_path / "out")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "adapterd convert chatglm3: tensor transformer.output_layer.weight is missing")
    assert "Traceback" not in done.stderr
    _nothing_left(tmp_path)


def test_a_prefix_that_disagrees_with_its_config_is_refused(chatglm3, tmp_path):
    """config.json says prefix_projection but the MLP is not there: serving the raw table would be wrong."""
    import json

    src = write_prefix_checkpoint(tmp_path / "pt", chatglm3.tiny, torch.zeros(4, 128))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "prefix_projection": True}))
    with pytest.raises(FailedPrecondition, match=r"prefix_encoder\.trans\.0\.weight is missing"):
        convert_chatglm3_adapter(src, tmp_path / "out", chatglm3.dst)
    (src / "config.json").write_text(json.dumps({**config, "pre_seq_len": 16}))
    with pytest.raises(FailedPrecondition, match="pre_seq_len is 16"):
        convert_chatglm3_adapter(src, tmp_path / "out", chatglm3.dst)
    _nothing_left(tmp_path)
