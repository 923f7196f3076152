"""The chat template an adapter is trained with, recorded beside its weights so that it travels with it.

The trainer formats every example with the Alpaca prompt (``data.format_prompt``), or with
``--prompt-format chat`` as a conversation in the base tokenizer's own chat template (``data.chat_texts``). At
inference a chat message must reach the model in the same form, or a trained adapter answers noise. So
every checkpoint and exported adapter holds the tokenizer with that template as its ``chat_template``
(``chat_template.jinja`` beside ``adapter_config.json``, as transformers saves a tokenizer):
``AutoTokenizer.from_pretrained(ADAPTER).apply_chat_template(...)`` and the daemon render a conversation exactly
as training formatted it, and plain PEFT, which reads only the ``adapter_*`` files, loads the adapter
unchanged. A ``chat`` run records the base's own template (its examples were rendered with it).

The Alpaca template, for ``[system?, user, assistant, user, ...]``:

- the system message replaces Alpaca's opening sentence ("Below is an instruction ...");
- each user message becomes ``\\n\\n### Instruction:\\n{content}\\n\\n### Response:`` (the response marker is
  part of the turn: the answer follows it directly, as in training);
- each assistant message is its content and the end-of-sequence token, as training ends each answer.

A single user message renders exactly to ``format_prompt(content)``, the tokenizer's BOS included when the
tokenizer adds one to a plain prompt (the rendered text is tokenized without special tokens, as chat
templates are). Alpaca records with an ``input`` field have no chat form; their prompts are not covered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import PROMPT_NO_INPUT

HEADER, _, _ = PROMPT_NO_INPUT.partition("\n\n")  # "Below is an instruction ... completes the request."
TEMPLATE_FILE = "chat_template.jinja"  # the name transformers gives a tokenizer's template file

# {BOS} and {HEADER} are filled in by ``alpaca_chat_template``; the rest is Jinja, whose string literals
# read "\n" as a newline.
_ALPACA = r"""{BOS}
{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] -}}
{%- set turns = messages[1:] -%}
{%- else -%}
{{- '{HEADER}' -}}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{- '\n\n### Instruction:\n' + message['content'] + '\n\n### Response:' -}}
{%- elif message['role'] == 'assistant' -%}
{{- message['content'] + eos_token -}}
{%- else -%}
{{- raise_exception('the Alpaca template takes one system message first, then user and assistant ones') -}}
{%- endif -%}
{%- endfor -%}"""


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token before a plain prompt (Llama's does; GPT-2-like ones not)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def alpaca_chat_template(tokenizer: Any) -> str:
    """The Jinja chat template that renders a conversation as this trainer formats examples for
    ``tokenizer`` (module docstring)."""
    bos = "{{- bos_token -}}" if adds_bos(tokenizer) else ""
    return _ALPACA.replace("{BOS}", bos).replace("{HEADER}", HEADER.replace("'", "\\'"))


def save_tokenizer_with_template(tokenizer: Any, directory: Path, prompt_format: str = "alpaca") -> None:
    """Write ``tokenizer`` into ``directory`` with the template its examples were formatted with as its chat
    template (the files ``save_pretrained`` writes: ``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``): the Alpaca one, or for ``--prompt-format chat`` the base's own, which ``chat``
    examples were rendered with. The tokenizer object itself is left as it was."""
    before = tokenizer.chat_template
    if prompt_format == "alpaca":
        tokenizer.chat_template = alpaca_chat_template(tokenizer)
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        tokenizer.chat_template = before
