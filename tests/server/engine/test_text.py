"""Incremental detokenization and stop sequences."""

from __future__ import annotations

import pytest

from adapterd.server.engine.text import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream_all(tokenizer, text, **kw):
    ids = tokenizer(text, add_special_tokens=False).input_ids
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
