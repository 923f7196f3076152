"""Tenants' text to token ids for one base model: prompts with their length limits, chat messages rendered
with the adapter's template (``server/chat.py``), and ``Tokenize``.

Used where requests arrive: by the in-process ``Runtime`` and by each front end of an engine-core process
(``server/core/client.py``), which tokenizes with its own copy of the tokenizer so that only token ids cross to
the engine. Tokenizing and rendering run in ``server/tokenizing.py``'s pools, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .chat import render as render_chat
from .chat import template_for
from .core.protocol import AdapterRef
from .errors import InvalidArgument
from .tokenizing import Tokenization


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    truncated: bool


class Prompts:
    def __init__(self, tokenizer: Any, max_sequence_length: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length  # positions, virtual tokens and generated ones included
        self.vocab_size = vocab_size  # rows of the base's token embedding
        self.tokenization = Tokenization(tokenizer)

    def close(self) -> None:
        self.tokenization.close()

    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        """``special_tokens=False`` for a rendered chat prompt, whose template wrote them (BOS...) itself."""
        return self.tokenizer(text, add_special_tokens=special_tokens).input_ids

    def _tokens_and_pieces(self, text: str, with_pieces: bool, special_tokens: bool) -> tuple[list[int], list[str]]:
        ids = self.tokenize(text, special_tokens)
        return ids, (self.tokenizer.convert_ids_to_tokens(ids) if with_pieces else [])

    async def tokenize_text(self, text: str, with_pieces: bool = False,
                            special_tokens: bool = True) -> tuple[list[int], list[str]]:
        """Token ids (and their pieces) of ``text``, tokenized off the event loop."""
        return await self.tokenization.run(text, self._tokens_and_pieces, text, with_pieces, special_tokens)

    async def render_messages(self, messages: list[dict[str, str]], adapter: AdapterRef | None) -> str:
        """Chat messages (checked by ``validation.validate_messages``) as the prompt text: the adapter's chat
        template, else the base tokenizer's, else the Alpaca default (``server/chat.py``). Rendered in the
        tokenizing lanes, off the event loop; tokenize the result with ``special_tokens=False``."""
        template = template_for(adapter.chat_template if adapter else None, self.tokenizer)
        owner = f"adapter {adapter.adapter_id!r}" if adapter else "the base model"
        contents = "".join(m["content"] for m in messages)  # its length picks the lane
        return await self.tokenization.run(contents, render_chat, self.tokenizer, messages, template, owner)

    def _input_limit(self, max_input_tokens: int, virtual_tokens: int) -> int:
        return min(max_input_tokens, self.max_sequence_length - 1 - virtual_tokens)

    async def prompt_ids(self, prompt: str, truncate_to: int, max_input_tokens: int, virtual_tokens: int = 0, *,
                         special_tokens: bool = True, field: str = "prompt") -> PreparedPrompt:
        """``prepare_prompt`` off the event loop; a prompt that certainly has too many tokens is refused
        before it is tokenized (``Tokenization.fits``), unless the request asks for truncation. A rendered
        chat prompt: ``special_tokens=False``, ``field="messages"`` (what errors name)."""
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if not truncate_to and not self.tokenization.fits(prompt, limit):
            raise InvalidArgument(f"prompt has {len(prompt)} characters, more than {limit} tokens can hold (set "
                                  "truncate_input_tokens to keep only the last tokens)", field=field)
        return await self.tokenization.run(prompt, self.prepare_prompt, prompt, truncate_to, max_input_tokens,
                                           virtual_tokens, special_tokens, field)

    def prepare_prompt(self, prompt: str, truncate_to: int, max_input_tokens: int, virtual_tokens: int = 0,
                       special_tokens: bool = True, field: str = "prompt") -> PreparedPrompt:
        """Token ids of ``prompt``. Too long -> InvalidArgument, or keep the last ``truncate_to`` tokens when
        the request asks for truncation. A prefix adapter's ``virtual_tokens`` take positions too."""
        return self.checked_ids(self.tokenize(prompt, special_tokens), truncate_to, max_input_tokens, virtual_tokens,
                                field)

    def sent_ids(self, ids: Sequence[int], truncate_to: int, max_input_tokens: int,
                 virtual_tokens: int = 0) -> PreparedPrompt:
        """A prompt sent as token ids (``prompt_token_ids``), on the event loop: no tokenizing, and at most the
        input limit's ids are looked at (more is refused by its length, or cut to the last ``truncate_to``
        first). Each kept id must be a row of the token embedding: one past them would index out of it on the
        device, which fails the whole batch and not only this request."""
        prepared = self.checked_ids(list(ids), truncate_to, max_input_tokens, virtual_tokens, "prompt_token_ids")
        offset = len(ids) - len(prepared.ids)  # ids cut off the front: errors name the index in what was sent
        for i, token in enumerate(prepared.ids):
            if token >= self.vocab_size:
                raise InvalidArgument(f"{token} is not a token id of this model (its vocabulary has "
                                      f"{self.vocab_size})", field=f"prompt_token_ids[{i + offset}]")
        return prepared

    def checked_ids(self, ids: list[int], truncate_to: int, max_input_tokens: int, virtual_tokens: int = 0,
                    field: str = "prompt") -> PreparedPrompt:
        """Prompt token ids within the limits: kept as they are, or their last ``truncate_to`` when the request
        asks for truncation; too many -> InvalidArgument naming ``field``."""
        if not ids:
            raise InvalidArgument("must not be empty", field=field)
        truncated = False
        if truncate_to and len(ids) > truncate_to:
            ids, truncated = ids[-truncate_to:], True
        limit = self._input_limit(max_input_tokens, virtual_tokens)
        if len(ids) > limit:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; at most {limit} are taken (set "
                                  "truncate_input_tokens to keep only the last ones)", field=field)
        return PreparedPrompt(ids=ids, truncated=truncated)


class PromptsFacade:
    """The prompt methods of the runtime facade (``Runtime``, ``EngineClient``), answered by ``self.prompts``."""

    prompts: Prompts

    async def tokenize_text(self, text: str, with_pieces: bool = False,
                            special_tokens: bool = True) -> tuple[list[int], list[str]]:
        return await self.prompts.tokenize_text(text, with_pieces, special_tokens)

    async def render_messages(self, messages: list[dict[str, str]], adapter: AdapterRef | None) -> str:
        return await self.prompts.render_messages(messages, adapter)

    def sent_ids(self, ids: Sequence[int], truncate_to: int, max_input_tokens: int,
                 virtual_tokens: int = 0) -> PreparedPrompt:
        return self.prompts.sent_ids(ids, truncate_to, max_input_tokens, virtual_tokens)

    async def prompt_ids(self, prompt: str, truncate_to: int, max_input_tokens: int, virtual_tokens: int = 0, *,
                         special_tokens: bool = True, field: str = "prompt") -> PreparedPrompt:
        return await self.prompts.prompt_ids(prompt, truncate_to, max_input_tokens, virtual_tokens,
                                             special_tokens=special_tokens, field=field)
