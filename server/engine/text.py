"""Turning a row's token ids into text as they come: incremental detokenization and stop sequences.

Decoding a growing id list one token at a time must not split a multi-byte character (a Chinese
character is often several byte-level tokens) nor drop the space a sentencepiece token carries, so each
step decodes a short window that starts a few tokens back and emits only what is new and complete
(the method of TGI's ``decode_token``, and of ``tokenizers``' ``DecodeStream``, which vLLM uses). Text that
could be the start of a stop sequence is held back until it is known not to be one.

Byte-fallback tokenizers (SentencePiece's, Llama's and ChatGLM3's among them) spell a character missing from
the vocabulary as byte pieces ``<0xE4>``, and their decoder (``tokenizers``' ``ByteFallback``) turns each run of
consecutive byte pieces into text as a whole: its characters if the run is valid UTF-8, else one U+FFFD per
piece. A byte piece can therefore change the text of the pieces before it in its run (``<0x53> <0x41>`` is
"SA", ``<0x53> <0x41> <0xE4>`` is three U+FFFD), so nothing of a run is final until a piece that is not a byte
ends it: the window never advances inside a run. ``DecodeStream`` does advance there, and fails with "invalid
prefix" when the run breaks (vLLM then starts its stream again); here the concatenated text always equals
``tokenizer.decode(ids, skip_special_tokens=True)``. A special token is skipped by that decode, so it neither
ends a run nor changes the text.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece, as SentencePiece names them
_QUIET: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def quiet_ids(tokenizer: Any) -> frozenset[int]:
    """The ids after which a stream has no new text to look for: special tokens (the decode skips them) and
    byte pieces (their run is not over; module docstring). One pass over the vocabulary per tokenizer, kept
    while the tokenizer lives, so that a streamed token costs a set lookup."""
    found = _QUIET.get(tokenizer)
    if found is None:
        bytes_ = (i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))
        found = _QUIET[tokenizer] = frozenset(tokenizer.all_special_ids).union(bytes_)
    return found


class TextStream:
    def __init__(self, tokenizer: Any, stop_sequences: tuple[str, ...] = (),
                 include_stop_sequence: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop_sequences = stop_sequences
        self.include_stop_sequence = include_stop_sequence
        self.ids: list[int] = []
        self.text = ""  # every complete character decoded so far
        self.emitted = 0  # how much of ``text`` was handed out
        self.stopped_by: str = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._scanned = 0  # ``text`` before this index holds no stop sequence
        self._before: str | None = None
        self._quiet = quiet_ids(tokenizer)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        if token_id in self._quiet:
            return  # no new text yet: a skipped token adds none, a byte piece's run is not over (module doc)
        if self._before is None:  # the window's settled part; decoded once per window, not per token
            self._before = self._decode(self._prefix_offset, self._read_offset)
        after = self._decode(self._prefix_offset, len(self.ids))
        if len(after) > len(self._before) and not after.endswith("\ufffd"):
            self.text += after[len(self._before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._before = None
        self._find_stop()

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def flush(self) -> None:
        """At the end of the answer: keep whatever is still undecoded, broken characters included, so that
        the whole text equals ``tokenizer.decode(ids)``."""
        if self._read_offset < len(self.ids) and not self.stopped_by:
            before = self._decode(self._prefix_offset, self._read_offset)
            self.text += self._decode(self._prefix_offset, len(self.ids))[len(before):]
            self._prefix_offset = self._read_offset = len(self.ids)
            self._before = None
            self._find_stop()

    def take(self, final: bool = False) -> str:
        """The text not yet handed out, less what might still turn into a stop sequence."""
        if final:
            self.flush()
        end = len(self.text) if (final or self.stopped_by) else len(self.text) - self._holdback()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _find_stop(self) -> None:
        if not self.stop_sequences or self.stopped_by:
            return
        longest = max(len(s) for s in self.stop_sequences)
        start = max(0, self._scanned - longest + 1)
        hits = [(self.text.find(s, start), s) for s in self.stop_sequences]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.stopped_by = s
            self.text = self.text[: i + len(s)] if self.include_stop_sequence else self.text[:i]
        self._scanned = len(self.text)

    def _holdback(self) -> int:
        """Length of the longest end of ``text`` that is a proper start of some stop sequence."""
        best = 0
        for s in self.stop_sequences:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
