"""Plain PEFT's loss curve on Alpaca records: the oracle the trainer's curve is judged against (issue 20).

The usual recipe written from PEFT's and transformers' docs, calling none of adapterd's trainer code: the
records in the Alpaca prompt (llama-recipes' template, written out again here), the loss on the response and
EOS only, ``get_peft_model`` after ``torch.manual_seed(seed)``, AdamW, transformers' linear schedule, gradient
clipping at 1.0, and PEFT's own forward (``peft_model(**batch).loss``, prefix tuning included). What it shares
with the trainer is only what the trainer documents: batches in the order of ``torch.randperm`` seeded with
``seed * 1_000_003 + epoch``, right padding, the RNG reseeded with ``seed`` before the first step (so that LoRA
dropout draws the same masks).

Used by tests/trainer/test_loss_curve.py (24 steps on the CPU) and bench/loss_curve.py (200 on the GPU); imports
nothing of adapterd or of bench/, so both can load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def examples(tokenizer, data: Path) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per record: the prompt with the tokenizer's special tokens, masked to -100."""
    out = []
    for record in json.loads(Path(data).read_text(encoding="utf-8")):
        if record.get("input"):  # the tutorial's examples have none: one template is enough here
            raise ValueError("the oracle writes the Alpaca prompt without input only")
        prompt = tokenizer(ALPACA.format(instruction=record["instruction"]))["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])}


def peft_losses(base_dir: Path, data: Path, method: str, *, steps: int, batch_size: int, lr: float, seed: int,
                device: str = "cpu", dtype: torch.dtype = torch.float32, num_virtual_tokens: int = 16,
                lora_dropout: float = 0.05, attn_implementation: str | None = None,
                save_to: Path | None = None) -> list[float]:
    """Per-step losses of plain PEFT + torch training (LoRA r 8, alpha 32, q_proj+v_proj; or prefix tuning
    without projection) on ``data``, the base loaded in ``dtype`` on ``device`` with transformers' attention
    ``attn_implementation`` (None: its default, sdpa). ``save_to``: where the trained adapter is saved
    (``save_pretrained``), for ``adapter_loss``."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = examples(tokenizer, data)
    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **chosen).to(device)
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=32, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj"],
                            bias="none", task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=False,
                                    task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    torch.manual_seed(seed)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, len(records), batch_size):
            if len(losses) == steps:
                break
            batch = _batch([records[i] for i in order[start:start + batch_size]], pad)
            loss = peft_model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        epoch += 1
    if save_to is not None:
        peft_model.save_pretrained(save_to)
    return losses


def adapter_loss(base_dir: Path, data: Path, adapter_dir: Path, device: str = "cpu") -> float:
    """Where a training run ended, judged the same way for every run: the mean loss per response token of the
    adapter in ``adapter_dir`` (PEFT's format, whoever trained it) over every record of ``data``, one record at a
    time, with plain PEFT on the base in fp32, in eval mode (no dropout). Unlike one step's loss, it does not
    hang on which records that step's batch held."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).to(device).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples(tokenizer, data):
            batch = {k: v.to(device) for k, v in _batch([(ids, labels)], pad).items()}
            scored = sum(1 for label in labels[1:] if label != -100)  # the loss is shifted by one token
            total += float(peft_model(**batch).loss) * scored
            tokens += scored
    return total / tokens
