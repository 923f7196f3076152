"""ChatGLM3's tokenizer without remote code: its SentencePiece ``tokenizer.model`` (BPE with byte fallback)
as a ``tokenizers`` BPE model, its nine special tokens, and its chat format as the chat template.

The ``.model`` file is a ``sentencepiece_model.proto`` message, parsed with protobuf alone (transformers ships
the generated module). SentencePiece's BPE encodes by merging, again and again, the adjacent pair whose
concatenation is a piece with the highest score; a ``tokenizers`` BPE whose merges are ranked by that score
(``generate_merges`` with the scores, as transformers' own converters do) makes the same choices. A text the
vocabulary cannot spell falls back to byte pieces ``<0x..>``. The normalizer does what SentencePiece's
``identity`` normalizer does with ``add_dummy_prefix``: a ``▁`` before each segment, spaces as ``▁``; a special
token splits segments, so ``<|user|>\\n hi`` encodes as ChatGLM3's ``build_chat_input`` encodes the role's
``"\\n"`` and the message ``"hi"`` separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition
from .chatglm3_layout import SPECIAL_TOKENS

# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2  # TrainerSpec.model_type

# ChatGLM3's chat format (tokenization_chatglm.py ``build_chat_input``): [gMASK]sop, then each message as its
# role token, "\n" and the text (each encoded on its own, so with SentencePiece's leading "▁": the space here),
# then <|assistant|> for the answer. Roles other than system, user, assistant are refused.
CHAT_TEMPLATE = (
    "[gMASK]sop"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('ChatGLM3 has no role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def read_spm(path: Path) -> Any:
    """The parsed ``ModelProto``; FailedPrecondition unless it is a BPE model with byte fallback and the
    identity normalizer (ChatGLM3's)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or a message that does not fit the schema
        raise FailedPrecondition(f"{path.name} is not a SentencePiece model ({type(exc).__name__})") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if not proto.pieces:
        raise FailedPrecondition(f"{path.name} holds no pieces")
    if spec.model_type != SP_BPE or not spec.byte_fallback:
        raise FailedPrecondition(f"{path.name}: a BPE model with byte fallback was expected (ChatGLM3's), not "
                                 f"model_type {spec.model_type}, byte_fallback {spec.byte_fallback}")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or norm.name not in ("", "identity"):
        raise FailedPrecondition(f"{path.name}: normalizer {norm.name!r} is not supported (ChatGLM3's is "
                                 "'identity' without whitespace removal)")
    return proto


def build_tokenizer(path: Path) -> Any:
    """A transformers fast tokenizer equal to ChatGLM3's: ids 0 .. n-1 the SentencePiece pieces, then the
    special tokens; ``tokenizer(text)`` starts with ``[gMASK] sop`` as ChatGLM3's does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = read_spm(path)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    scores = {p.piece: p.score for p in pieces if p.type in (NORMAL, USER_DEFINED)}
    skip = [p.piece for p in pieces if p.type not in (NORMAL, USER_DEFINED)]
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    unk = pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    dummy = proto.normalizer_spec.add_dummy_prefix
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if dummy else []),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if dummy else [])])
    first = len(pieces)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(first, first + len(SPECIAL_TOKENS))):
        raise FailedPrecondition(f"{path.name}: a special token of ChatGLM3 is already a piece of the model")
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", pair="[gMASK] sop $A $B",
        special_tokens=[("[gMASK]", first + 1), ("sop", first + 3)])
    spec = proto.trainer_spec
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, eos_token=pieces[spec.eos_id].piece,
        pad_token=unk, additional_special_tokens=list(SPECIAL_TOKENS), padding_side="left",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
