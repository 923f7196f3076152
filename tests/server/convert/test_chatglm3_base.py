"""``adapterd convert chatglm3``: the converted GlmForCausalLM computes ChatGLM3's function (its logits equal
a forward written from the architecture's description), and its tokenizer is ChatGLM3's (SentencePiece's own
encoding, the special tokens, ``build_chat_input``'s chat format)."""

from __future__ import annotations

import json

import pytest
import torch

from adapterd.server.convert.chatglm3 import convert_chatglm3
from tests.server.convert.chatglm3_fixture import SPECIAL, Tiny, reference_logits, rope, write_checkpoint

TEXTS = ["The quick brown fox jumps over the lazy dog. Hello world",
         "你是谁？我是Gitclone，一个语言模型。今天天气很好，我们一起去公园散步吧。机器学习",
         "zebra quartz ✓ 😀 tabs\tand\nnewlines  two  spaces", " leading space", "1234 5678"]


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _sp(src):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))


def _chatglm_ids(sp, text: str) -> list[int]:
    """ChatGLM3's tokenizer(text): [gMASK] sop, then SentencePiece's encoding."""
    n = sp.vocab_size()
    return [n + SPECIAL.index("[gMASK]"), n + SPECIAL.index("sop"), *sp.encode(text)]


def _build_chat_input(sp, messages: list[dict]) -> list[int]:
    """THUDM's build_chat_input: role token, encode(metadata + "\\n"), encode(content); then <|assistant|>."""
    n = sp.vocab_size()
    ids = [n + SPECIAL.index("[gMASK]"), n + SPECIAL.index("sop")]
    for m in messages:
        ids += [n + SPECIAL.index(f"<|{m['role']}|>"), *sp.encode("\n"), *sp.encode(m["content"])]
    return ids + [n + SPECIAL.index("<|assistant|>")]


@torch.no_grad()
def test_logits_equal_the_reference_forward(chatglm3):
    model = _model(chatglm3.dst)
    sp = _sp(chatglm3.src)
    long = _chatglm_ids(sp, " ".join(TEXTS) * 3)  # positions far enough for every rotary pair to turn
    assert len(long) > 100
    for ids in (long, _chatglm_ids(sp, TEXTS[2])):
        got = model(torch.tensor([ids])).logits[0]
        want = reference_logits(chatglm3.weights, chatglm3.tiny, ids)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_the_rotary_layout_and_ratio_are_what_the_test_proves():
    """The reference is sensitive to what it proves: other rotary layouts or ratios give other numbers."""
    x = torch.randn(5, 2, 16)
    pos = torch.arange(5)
    turned = rope(x, pos, Tiny())
    assert torch.equal(turned[..., 8:], x[..., 8:])  # the second half of each head passes unrotated
    assert not torch.allclose(turned, rope(x, pos, Tiny(rope_ratio=1.0)))
    halves = torch.cat([x[..., 0:8:2], x[..., 1:8:2]], dim=-1)  # the non-interleaved pairing differs
    assert not torch.allclose(turned[..., :8], rope(torch.cat([halves, x[..., 8:]], -1), pos, Tiny())[..., :8])


def test_config_is_glm_with_chatglm3s_fields(chatglm3):
    config = json.loads((chatglm3.dst / "config.json").read_text())
    tiny = chatglm3.tiny
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert (config["head_dim"], config["num_key_value_heads"], config["intermediate_size"]) == (
        tiny.kv_channels, tiny.multi_query_group_num, tiny.ffn_hidden_size)
    assert config["rope_parameters"]["rope_theta"] == 10000 * tiny.rope_ratio
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["vocab_size"] == tiny.padded_vocab_size and config["max_position_embeddings"] == tiny.seq_length
    n = _sp(chatglm3.src).vocab_size()
    assert config["eos_token_id"] == [2, n + SPECIAL.index("<|user|>"), n + SPECIAL.index("<|observation|>")]


def test_tokenizer_encodes_as_sentencepiece_and_decodes_back(chatglm3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatglm3.dst)
    sp = _sp(chatglm3.src)
    for text in TEXTS:
        assert tok(text).input_ids == _chatglm_ids(sp, text), text
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == sp.decode(sp.encode(text))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL] == list(range(sp.vocab_size(), sp.vocab_size() + 9))
    assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.unk_id())


def test_chat_template_is_build_chat_input(chatglm3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatglm3.dst)
    sp = _sp(chatglm3.src)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你是谁？"},
                    {"role": "assistant", "content": "我是Gitclone，一个语言模型。"},
                    {"role": "user", "content": "hello world"}]
    for messages in (conversation[1:2], conversation):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("[gMASK]sop<|")
        assert tok(text, add_special_tokens=False).input_ids == _build_chat_input(sp, messages)


@torch.no_grad()
def test_a_bin_checkpoint_converts_the_same(chatglm3, tmp_path):
    """THUDM also publishes pytorch_model-*.bin shards: read with torch.load(weights_only=True)."""
    import shutil

    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(chatglm3.src / "tokenizer.model", src)
    write_checkpoint(src, chatglm3.tiny, chatglm3.weights, fmt="bin")
    convert_chatglm3(src, tmp_path / "out", max_shard_bytes=200_000)  # several output shards and an index
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    ids = torch.tensor([_chatglm_ids(_sp(src), TEXTS[0])])
    torch.testing.assert_close(_model(tmp_path / "out")(ids).logits, _model(chatglm3.dst)(ids).logits,
                               atol=0, rtol=0)


@pytest.mark.parametrize("rope_ratio", [1.0, 50.0])
def test_rope_ratio_scales_the_base(tmp_path, rope_ratio, chatglm3):
    import shutil

    tiny = Tiny(rope_ratio=rope_ratio, padded_vocab_size=chatglm3.tiny.padded_vocab_size)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(chatglm3.src / "tokenizer.model", src)
    write_checkpoint(src, tiny, chatglm3.weights)
    convert_chatglm3(src, tmp_path / "out")
    ids = _chatglm_ids(_sp(src), TEXTS[0] * 2)
    with torch.no_grad():
        got = _model(tmp_path / "out")(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, reference_logits(chatglm3.weights, tiny, ids), atol=2e-5, rtol=1e-5)


def test_the_converter_needs_no_sentencepiece(chatglm3):
    """The .model file is parsed with protobuf alone: with sentencepiece hidden, the same ids."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    code = ("import sys; sys.modules['sentencepiece'] = None\n"
            "from pathlib import Path\n"
            "from adapterd.server.convert.tokenizer import build_tokenizer\n"
            f"print(build_tokenizer(Path(sys.argv[1]))({TEXTS[1]!r}).input_ids)")
    done = subprocess.run([sys.executable, "-c", code, str(chatglm3.src / "tokenizer.model")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(AutoTokenizer.from_pretrained(chatglm3.dst)(TEXTS[1]).input_ids)
