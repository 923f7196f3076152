"""Chat messages -> the prompt text the model is given, with the right chat template.

Which template: the adapter's own (the one it was trained with, read by the store from the adapter's
directory: ``LoadedAdapter.chat_template``), else the base tokenizer's, else the Alpaca template adapterd's
trainer formats examples with (``trainer/template.py``), so that adapters trained before templates were
recorded answer as they were trained.

Rendering goes through transformers' ``apply_chat_template`` (a sandboxed Jinja environment: a template from
a tenant's adapter directory cannot reach Python objects), with the generation prompt added, so that the
model answers as the assistant. The rendered text holds the template's special tokens (BOS...) itself: it is
tokenized without adding special tokens again (``Runtime.prompt_ids(..., special_tokens=False)``).
"""

from __future__ import annotations

from typing import Any

from adapterd.server.errors import FailedPrecondition, InvalidArgument
from adapterd.trainer.template import alpaca_chat_template

MAX_ERROR_CHARS = 300  # of a template's own complaint, quoted back to the client


def template_for(adapter_template: str | None, tokenizer: Any) -> str:
    """The template a conversation is rendered with (module docstring)."""
    if adapter_template:
        return adapter_template
    base_template = getattr(tokenizer, "chat_template", None)
    if isinstance(base_template, str) and base_template:
        return base_template
    return alpaca_chat_template(tokenizer)


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, owner: str) -> str:
    """``messages`` rendered with ``template`` and the generation prompt. A template that refuses the
    conversation (``raise_exception``: roles that do not alternate, say) is INVALID_ARGUMENT on ``messages``
    with the template's own words; one that cannot be used at all (not valid Jinja, a failing expression)
    is FAILED_PRECONDITION naming ``owner`` (the adapter, or the base model)."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.exceptions import SecurityError

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateSyntaxError as exc:
        raise FailedPrecondition(f"the chat template of {owner} is not valid Jinja (line {exc.lineno}: "
                                 f"{str(exc.message)[:MAX_ERROR_CHARS]})") from None
    except SecurityError as exc:
        raise FailedPrecondition(f"the chat template of {owner} does what the sandbox forbids "
                                 f"({str(exc)[:MAX_ERROR_CHARS]})") from None
    except TemplateError as exc:
        raise InvalidArgument(f"the chat template of {owner} refused them: {str(exc)[:MAX_ERROR_CHARS]}",
                              field="messages") from None
    except Exception as exc:  # noqa: BLE001 - a template's expression failed: the template's fault, said so
        raise FailedPrecondition(f"the chat template of {owner} failed on these messages "
                                 f"({type(exc).__name__})") from None
    if not isinstance(text, str):  # older transformers return a list for a batch of one
        text = text[0]
    return text
