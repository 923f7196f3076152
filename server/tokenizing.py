"""Tokenizing tenants' text off the event loop, in small bounded thread pools, after a cheap size check.

A 4 MB ``Tokenize`` took 9.8 s on the event loop and stalled every other stream. Here every tokenization
runs in a worker thread (Hugging Face's fast tokenizers release the GIL while they work), in one of two
lanes, so that a small text never waits behind a large one:

- texts up to ``SMALL_TEXT_CHARS`` characters (about 10 ms of tokenizing each) take the small lane;
- longer ones take the large lane: one thread, and at most ``MAX_LARGE_WAITING`` of them queued or running
  (more: RESOURCE_EXHAUSTED), so that one tenant's large texts cannot occupy every core.

The size check before tokenizing (``fits``): a token never stands for more bytes of text than the longest
piece of the vocabulary takes in UTF-8 (``max_token_bytes``; the longest piece spelled out, so an upper
bound for SentencePiece's "▁" and byte-level BPE's mapped bytes alike), and a text has at least as many
bytes as characters. A prompt of more than ``limit * max_token_bytes`` characters therefore has more than
``limit`` tokens and is refused without tokenizing it. (Only a normalizer that deletes characters could
break this; a text of that many characters is refused then too, which the message says in characters.)
A request asking for ``truncate_input_tokens`` skips this check, since it wants the last tokens of a longer
prompt: it is bounded by ``MAX_PROMPT_CHARS`` and tokenized in the large lane like any long text.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import ResourceExhausted

T = TypeVar("T")

SMALL_TEXT_CHARS = 16_384  # measured on the CPU: ~1.3 M characters a second, so ~12 ms a text at most
SMALL_LANE_THREADS = 2
MAX_LARGE_WAITING = 8  # large texts queued or being tokenized at once (each bounded by MAX_PROMPT_CHARS)


def longest_piece_bytes(tokenizer: Any) -> int:
    """The UTF-8 length of the tokenizer's longest vocabulary piece (added tokens included), at least 1."""
    return max((len(piece.encode("utf-8")) for piece in tokenizer.get_vocab()), default=1) or 1


class Tokenization:
    """The tokenizer's two lanes (module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.max_token_bytes = longest_piece_bytes(tokenizer)
        self._small = ThreadPoolExecutor(SMALL_LANE_THREADS, thread_name_prefix="adapterd-tokenize")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="adapterd-tokenize-large")
        self._large_waiting = 0  # touched from the event loop only

    def fits(self, text: str, max_tokens: int) -> bool:
        """False only when ``text`` certainly has more than ``max_tokens`` tokens (module docstring)."""
        return len(text) <= max_tokens * self.max_token_bytes

    async def run(self, text: str, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the lane that ``text``'s length picks."""
        loop = asyncio.get_running_loop()
        call = functools.partial(work, *args)
        if len(text) <= SMALL_TEXT_CHARS:
            return await loop.run_in_executor(self._small, call)
        if self._large_waiting >= MAX_LARGE_WAITING:
            raise ResourceExhausted(f"{MAX_LARGE_WAITING} long texts are being tokenized already; retry later")
        self._large_waiting += 1
        try:
            return await loop.run_in_executor(self._large, call)
        finally:
            self._large_waiting -= 1

    def close(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)
