"""Alpaca-style training data: reading, checking, prompting, tokenizing, batching.

A record is ``{"instruction": str, "input": str (may be empty or absent), "output": str}``. The file is a JSON
list of records or JSON lines (one record per line). The prompt is llama-recipes' Alpaca template; the loss
falls only on the response and the EOS token (prompt tokens carry the label -100), as in llama-recipes.

With the ``chat`` prompt format a record is a conversation instead (its optional ``system`` string first as
the system message, which the Alpaca prompt has no place for and ignores; user: the instruction, then the
input on a line of its own; assistant: the output), rendered with the base tokenizer's own chat template, as a base
like ChatGLM3 is fine-tuned and then chatted with: the prompt is the conversation up to the template's
generation prompt, the response is what the template writes for the assistant's message after it, and the
loss falls on that response (and EOS, unless the template's turn already holds it).

Nothing is dropped silently: a malformed record raises ``DataError`` naming its index and field, unless the
caller asks to skip such records, in which case they are counted and the count is reported.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    import torch

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
IGNORE_INDEX = -100


class DataError(ValueError):
    """A record (or the whole file) that cannot be used. ``index`` is 0-based: the list index, or the count
    of non-blank lines before it in JSON lines. The message never names the file: the caller does (adapterd
    train's ``--data``, StartTraining's ``data_path``)."""

    def __init__(self, index: int | None, field_name: str | None, message: str) -> None:
        where = f"record {index}" if index is not None else ""
        if field_name:
            where += f", field {field_name!r}" if where else f"field {field_name!r}"
        super().__init__(f"{where}: {message}" if where else message)
        self.index = index
        self.field = field_name


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one record; the response follows it directly (no separator)."""
    if input_text:
        return PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    system: str = ""  # the chat format's system message (optional)


@dataclass
class Dataset:
    """Checked records and what was skipped (index and reason of each)."""

    records: list[Record]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _check(index: int, raw: Any) -> Record:
    if not isinstance(raw, dict):
        raise DataError(index, None, f"expected an object with instruction/input/output, got {type(raw).__name__}")
    values: dict[str, str] = {}
    for name, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        value = raw.get(name, None if required else "")
        if value is None:
            if required:
                raise DataError(index, name, "is missing")
            value = ""
        if not isinstance(value, str):
            raise DataError(index, name, f"must be a string, not {type(value).__name__}")
        if required and not value.strip():
            raise DataError(index, name, "is empty")
        values[name] = value
    return Record(values["instruction"], values["input"], values["output"], values["system"])


def _raw_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, parsed item) for a JSON list or JSON lines; a line that is not JSON yields a DataError item."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(None, None, f"cannot read: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(None, None, "the file is empty")
    if stripped[0] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(None, None, f"not valid JSON: {exc}") from None
        yield from enumerate(items)
        return
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, DataError(index, None, f"line {line_no} is not valid JSON: {exc.msg}")
        index += 1


def load_records(path: str | Path, *, skip_malformed: bool = False) -> Dataset:
    """Read and check every record. Raises ``DataError`` on the first bad one unless ``skip_malformed``."""
    path = Path(path)
    data = Dataset(records=[])
    for index, raw in _raw_items(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            data.records.append(_check(index, raw))
        except DataError as exc:
            if not skip_malformed:
                raise
            data.skipped.append((index, str(exc)))
    if not data.records:
        raise DataError(None, None, f"no usable record ({len(data.skipped)} skipped)")
    return data


@dataclass(frozen=True)
class Example:
    """One tokenized record: ``labels`` is ``input_ids`` with the prompt masked to -100."""

    input_ids: list[int]
    labels: list[int]


def _alpaca_ids(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The Alpaca prompt with the tokenizer's own special tokens (e.g. BOS), as the server tokenizes a raw
    prompt; the response and EOS."""
    prompt_ids = tokenizer(format_prompt(record.instruction, record.input))["input_ids"]
    return prompt_ids, tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def chat_texts(record: Record, tokenizer: Any) -> tuple[str, str]:
    """The ``chat`` format's (prompt, response) texts of ``record`` with the base's chat template: the
    conversation up to the generation prompt, and what the template writes after it for the assistant."""
    from jinja2 import TemplateError

    user = record.instruction + (f"\n{record.input}" if record.input else "")
    system = [{"role": "system", "content": record.system}] if record.system else []
    asked = [*system, {"role": "user", "content": user}]
    try:
        prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": record.output}],
                                              tokenize=False)
    except TemplateError as exc:  # the template's raise_exception, or a render failure
        raise DataError(None, "instruction", f"the base's chat template refused the conversation: {exc}") from None
    if not whole.startswith(prompt):
        raise DataError(None, "output", "the base's chat template does not write the assistant's message after "
                        "its generation prompt, so the response cannot be told from the prompt")
    return prompt, whole[len(prompt):]


def _chat_ids(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Both texts tokenized without special tokens, as the server tokenizes a rendered conversation (the
    template writes BOS and role markers itself); EOS closes the response unless the template's turn has it."""
    prompt, response = chat_texts(record, tokenizer)
    answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id not in answer_ids:
        answer_ids.append(tokenizer.eos_token_id)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], answer_ids


def check_prompt_format(tokenizer: Any, prompt_format: str) -> None:
    """Raise ``ConfigError`` when ``tokenizer`` cannot format examples as ``prompt_format`` asks."""
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise ConfigError("prompt_format", "chat needs the base's tokenizer to have a chat template, and it has "
                          "none (use alpaca, or give the base one: chat_template.jinja beside its tokenizer)")


def tokenize(record: Record, tokenizer: Any, context_length: int, prompt_format: str = "alpaca") -> Example:
    """Prompt tokens as the server will see them, then the response tokens and EOS. The prompt and the
    response are tokenized apart, as at inference, where the prompt is tokenized alone and the response is
    generated token by token. Too long: cut at the end."""
    prompt_ids, answer_ids = (_chat_ids if prompt_format == "chat" else _alpaca_ids)(record, tokenizer)
    if len(prompt_ids) >= context_length:
        raise DataError(None, "instruction", f"prompt is {len(prompt_ids)} tokens, context_length is "
                        f"{context_length}: no room for the response")
    ids = (prompt_ids + answer_ids)[:context_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:context_length]
    return Example(ids, labels)


def tokenize_all(data: Dataset, tokenizer: Any, context_length: int, *, skip_malformed: bool,
                 prompt_format: str = "alpaca") -> list[Example]:
    """Tokenize every record; a prompt longer than the context is a malformed record (index named)."""
    out: list[Example] = []
    for index, record in enumerate(data.records):
        try:
            out.append(tokenize(record, tokenizer, context_length, prompt_format))
        except DataError as exc:
            err = DataError(index, exc.field, str(exc).split(": ", 1)[-1])
            if not skip_malformed:
                raise err from None
            data.skipped.append((index, str(err)))
    if not out:
        raise DataError(None, None, "no record fits the context length")
    return out


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``floor(n * fraction)`` examples (chosen with ``seed``) for eval; always keep one to train."""
    n_eval = min(int(len(examples) * fraction), len(examples) - 1)
    if n_eval <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so that a resumed
    run sees the same batches as an uninterrupted one."""
    import torch  # here, not at the top: reading and prompting records (adapterd demo, StartTraining) need none

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids (pad_id), attention_mask (0 on pads), labels (-100 on pads)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
