"""Chat messages -> the prompt text the model is given, with the right chat template.

Which template: the adapter's own (the one it was trained with, read by the store from the adapter's
directory: ``LoadedAdapter.chat_template``), else the base tokenizer's, else the Alpaca template adapterd's
trainer formats examples with (``trainer/template.py``), so that adapters trained before templates were
recorded answer as they were trained.

Rendering goes through transformers' ``apply_chat_template`` (a sandboxed Jinja environment: a template from
a tenant's adapter directory cannot reach Python objects), with the generation prompt added, so that the
model answers as the assistant. A template is code from a tenant, so its rendering is also bounded in time
(``MAX_RENDER_S``, checked at each call and each line of the template's code): nested loops cannot hold a
tokenizing lane, and with it every other request, for good. (A single huge expression, ``'x' * 10**10``, is
not stopped by this; Jinja's sandbox bounds ``range`` only.)

The rendered text holds the template's special tokens (BOS...) itself: it is tokenized without adding
special tokens again (``Runtime.prompt_ids(..., special_tokens=False)``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ..trainer.template import alpaca_chat_template
from .errors import FailedPrecondition, InvalidArgument

MAX_ERROR_CHARS = 300  # of a template's own complaint, quoted back to the client
MAX_RENDER_S = 2.0  # real templates render in milliseconds, a thousand messages in tens of them


class RenderTimeout(Exception):
    """Raised inside a rendering that ran past its deadline (by ``_deadline_tracer``)."""


def _deadline_tracer(deadline: float) -> Callable[..., Any]:
    """A trace function that raises ``RenderTimeout`` in the traced thread once ``time.monotonic()`` passes
    ``deadline``: Python propagates an exception raised by a trace function into the traced code. Every call
    is checked, and every line of the template's own code (Jinja compiles it to Python named "<template>"),
    where its loops run; lines elsewhere are not traced, which keeps the cost near a tenth of a millisecond
    a render."""
    def trace(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if time.monotonic() > deadline:
            raise RenderTimeout
        return trace if frame.f_code.co_filename == "<template>" else None
    return trace


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

    previous = sys.gettrace()
    sys.settrace(_deadline_tracer(time.monotonic() + MAX_RENDER_S))  # this worker thread only
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except RenderTimeout:
        raise FailedPrecondition(f"the chat template of {owner} took longer than {MAX_RENDER_S:g} s to "
                                 "render") from None
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
    finally:
        sys.settrace(previous)
    if not isinstance(text, str):  # older transformers return a list for a batch of one
        text = text[0]
    return text
