"""Incremental detokenization and stop sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterd.server.engine.text import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A SentencePiece BPE tokenizer with byte fallback (ChatGLM3's kind, and Llama's): rare characters are
    spelled as byte pieces ``<0xE4>``, which its decoder joins per run of consecutive byte pieces."""
    from adapterd.server.convert.tokenizer import build_tokenizer
    from tests.server.convert.chatglm3_fixture import write_tokenizer_model

    return build_tokenizer(write_tokenizer_model(tmp_path_factory.mktemp("spm") / "tokenizer.model"))


def stream_all(tokenizer, text, **kw):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return stream_ids(tokenizer, ids, **kw)


def stream_ids(tokenizer, ids, **kw):
    stream = TextStream(tokenizer, **kw)
    pieces = []
    for token in ids:
        stream.add(token)
        pieces.append(stream.take())
        if stream.stopped_by:
            break
    pieces.append(stream.take(final=True))
    return pieces, stream


def test_pieces_join_to_the_whole_text_without_broken_characters(tokenizer):
    text = "你是谁？我是Gitclone，一个语言模型。Hello, world!"
    byte_tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    assert len(byte_tokens) > 5
    pieces, _ = stream_all(tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_byte_fallback_characters_stream_whole(spm_tokenizer):
    """Characters the vocabulary lacks come as byte pieces; each streams once it is complete, never broken."""
    text = "鬱龘 hello 齉"
    ids = spm_tokenizer(text, add_special_tokens=False).input_ids
    assert sum(t.startswith("<0x") for t in spm_tokenizer.convert_ids_to_tokens(ids)) >= 9
    pieces, _ = stream_all(spm_tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_byte_run_that_ends_broken_decodes_as_a_whole(spm_tokenizer):
    """``<0x53> <0x41> <0xE4>``: "S", "A", then a character cut off. The tokenizer decodes a run of byte
    pieces that is not valid UTF-8 as one U+FFFD per piece, so the "SA" streamed early would be wrong."""
    ids = spm_tokenizer.convert_tokens_to_ids(["<0x53>", "<0x41>", "<0xE4>"])
    pieces, _ = stream_ids(spm_tokenizer, ids)
    assert "".join(pieces) == spm_tokenizer.decode(ids, skip_special_tokens=True) == "\ufffd" * 3


def _id_lists(tok) -> st.SearchStrategy[list[int]]:
    """Random id sequences, weighted towards what makes detokenizing hard: byte pieces (broken and whole
    characters) and special tokens (skipped by the decode, so invisible between two byte pieces)."""
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    byte_ids = [i for i, t in enumerate(tokens) if t.startswith("<0x") and t.endswith(">")]
    any_id = st.integers(0, len(tok) - 1)
    choices = [any_id, st.sampled_from(tok.all_special_ids)]
    if byte_ids:
        choices.append(st.sampled_from(byte_ids))
        # the lead and continuation bytes of UTF-8 (0x80-0xF4), so that whole multi-byte characters occur
        utf8 = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0x80, 0xF5)]
        choices.append(st.sampled_from(utf8))
    return st.lists(st.one_of(choices), max_size=40)


@pytest.mark.parametrize("which", ["tokenizer", "spm_tokenizer"])
def test_streamed_text_is_the_whole_decode(request, which):
    """Property: for any id sequence, taking text after every token (and at the end) yields exactly
    ``tokenizer.decode(ids, skip_special_tokens=True)``: byte-level BPE (the tiny model's) and SentencePiece
    with byte fallback alike."""
    tok = request.getfixturevalue(which)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_id_lists(tok))
    def check(ids):
        pieces, _ = stream_ids(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)

    check()


@pytest.mark.parametrize("include", [False, True])
def test_stop_sequence_cuts_the_text_and_is_never_streamed_early(tokenizer, include):
    text = "Hello world. The quick brown fox jumps over the lazy dog."
    pieces, stream = stream_all(tokenizer, text, stop_sequences=("brown fox", "zzz"), include_stop_sequence=include)
    assert stream.stopped_by == "brown fox"
    expected = "Hello world. The quick brown fox" if include else "Hello world. The quick "
    assert "".join(pieces) == expected
    # before the match was complete, no part of it was handed out
    if not include:
        assert all("brown" not in p for p in pieces)


def test_holdback_releases_text_that_turns_out_not_to_stop(tokenizer):
    pieces, stream = stream_all(tokenizer, "one two three", stop_sequences=("two x",))
    assert not stream.stopped_by
    assert "".join(pieces) == "one two three"
