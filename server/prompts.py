"""Tenants' text to token ids for one base model: prompts with their length limits, and ``Tokenize``.

Used where requests arrive: by the in-process ``Runtime`` and by each front end of an engine-core process
(``server/core/client.py``), which tokenizes with its own copy of the tokenizer so that only token ids cross to
the engine. Tokenizing runs in ``server/tokenizing.py``'s pools, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapterd.server.errors import InvalidArgument
from adapterd.server.tokenizing import Tokenization


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    truncated: bool


class Prompts:
    def __init__(self, tokenizer: Any, max_sequence_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length  # positions, virtual tokens and generated ones included
        self.tokenization = Tokenization(tokenizer)

    def close(self) -> None:
        self.tokenization.close()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def _tokens_and_pieces(self, text: str, with_pieces: bool) -> tuple[list[int], list[str]]:
        ids = self.tokenize(text)
        return ids, (self.tokenizer.convert_ids_to_tokens(ids) if with_pieces else [])

    async def tokenize_text(self, text: str, with_pieces: bool = False) -> tuple[list[int], list[str]]:
        """Token ids (and their pieces) of ``text``, tokenized off the event loop."""
        return await self.tokenization.run(text, self._tokens_and_pieces, text, with_pieces)

    def _input_limit(self, max_input_tokens: int, virtual_tokens: int) -> int:
        return min(max_input_tokens, self.max_sequence_length - 1 - virtual_tokens)

    async def prompt_ids(self, prompt: str, truncate_to: int, max_input_tokens: int,
                         virtual_tokens: int = 0) -> PreparedPrompt:
        """``prepare_prompt`` off the event loop; a prompt that certainly has too many tokens is refused
        before it is tokenized (``Tokenization.fits``), unless the request asks for truncation."""
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if not truncate_to and not self.tokenization.fits(prompt, limit):
            raise InvalidArgument(f"prompt has {len(prompt)} characters, more than {limit} tokens can hold (set "
                                  "truncate_input_tokens to keep only the last tokens)", field="prompt")
        return await self.tokenization.run(prompt, self.prepare_prompt, prompt, truncate_to, max_input_tokens,
                                           virtual_tokens)

    def prepare_prompt(self, prompt: str, truncate_to: int, max_input_tokens: int,
                       virtual_tokens: int = 0) -> PreparedPrompt:
        """Token ids of ``prompt``. Too long -> InvalidArgument, or keep the last ``truncate_to`` tokens when
        the request asks for truncation. A prefix adapter's ``virtual_tokens`` take positions too."""
        ids = self.tokenize(prompt)
        if not ids:
            raise InvalidArgument("must not be empty", field="prompt")
        truncated = False
        if truncate_to and len(ids) > truncate_to:
            ids, truncated = ids[-truncate_to:], True
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if len(ids) > limit:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; at most {limit} are taken (set "
                                  "truncate_input_tokens to keep only the last ones)", field="prompt")
        return PreparedPrompt(ids=ids, truncated=truncated)
