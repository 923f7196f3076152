"""Test helpers: adapters made by plain PEFT, and PEFT/transformers reference decoding (the oracle)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import torch

from adapterd.server.model import cache_kwarg, quantization_config

# Where the parity tests run: "cpu" here and in CI; ADAPTERD_TEST_DEVICE=cuda runs them on a GPU (fp32 there
# too, so that PEFT on the same device stays an exact oracle).
TEST_DEVICE = os.environ.get("ADAPTERD_TEST_DEVICE", "cpu")


def _load_base(model_dir: Path, quantization: str = "none", device: str = "cpu"):
    """The oracle's base: fp32, quantized with the daemon's own bitsandbytes settings (``quantization_config``)
    so that the quantized weights are the ones the engine serves."""
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(quantization, torch.float32)
    kwargs = {} if qconfig is None else {"quantization_config": qconfig, "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return model.to(device).eval() if not kwargs else model.eval()


def _like_the_engine(model):
    """Where the engine swaps bitsandbytes' int8 matmul for the weight-only kernel (on a GPU), the oracle does
    too, once PEFT has wrapped the layers (PEFT only wraps layers it knows): parity then checks batching
    exactly, and tests/server/kernels checks the kernel against bitsandbytes within a tolerance (bitsandbytes
    also quantizes activations)."""
    from adapterd.server.kernels import int8_kernel_available, use_int8_kernel

    if int8_kernel_available(TEST_DEVICE):
        use_int8_kernel(model)
    return model


def _randomize(model, seed: int) -> None:
    """PEFT starts LoRA B and prefix tables at values that make the adapter a no-op or near it:
    give every trainable tensor random values so that each adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def make_lora_adapter(base_dir, out_dir, *, r=8, alpha=16, targets=("q_proj", "v_proj"), seed=0,
                      use_rslora=False, **extra) -> Path:
    from peft import LoraConfig, get_peft_model

    model = _load_base(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, config)
    _randomize(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def make_prefix_adapter(base_dir, out_dir, *, num_virtual_tokens=8, projection=False, seed=0) -> Path:
    from peft import PrefixTuningConfig, get_peft_model

    model = _load_base(base_dir)
    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=projection,
                                encoder_hidden_size=32, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    _randomize(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def reference_greedy(base_dir, prompt: str, adapter_dir: Path | None, max_new_tokens: int,
                     quantization: str = "none", min_new_tokens: int = 0) -> list[int]:
    """Greedy tokens for one prompt alone, stopping before the first EOS (see ``_reference_tokens``); with
    ``min_new_tokens``, EOS banned until that many (transformers' ``MinNewTokensLengthLogitsProcessor``)."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(base_dir).eos_token_id
    tokens = _reference_tokens(base_dir, prompt, adapter_dir, max_new_tokens, quantization, min_new_tokens)
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def _reference_tokens(base_dir, prompt: str, adapter_dir: Path | None, max_new_tokens: int,
                      quantization: str = "none", min_new_tokens: int = 0) -> list[int]:
    """Greedy tokens for one prompt alone, computed by plain transformers + PEFT.

    LoRA and the base go through ``PeftModel.generate``. Prefix adapters go through a plain greedy loop
    that passes PEFT's own ``get_prompt()`` key/values as the cache, because ``generate()`` on
    transformers 5.24 + peft 0.21 silently drops the prefix (see the stack notes).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer, LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = _load_base(base_dir, quantization, TEST_DEVICE)
    ids = tok(prompt, return_tensors="pt").input_ids.to(TEST_DEVICE)
    # generate() stops at nothing (eos_token_id None), so the minimum length's ban is given as a processor
    # (the EOS id as a tensor on the model's device: transformers 5.17 builds it on the CPU otherwise)
    eos = torch.tensor([tok.eos_token_id], device=ids.device)
    processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(ids.shape[1], min_new_tokens, eos)]
                                     if min_new_tokens else [])
    if adapter_dir is None:
        out = _like_the_engine(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, logits_processor=processors)
        return out[0, ids.shape[1]:].tolist()
    config = PeftConfig.from_pretrained(adapter_dir)
    peft_model = _like_the_engine(PeftModel.from_pretrained(model, adapter_dir).eval())
    if config.peft_type != "PREFIX_TUNING":
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=None, logits_processor=processors)
        return out[0, ids.shape[1]:].tolist()
    cache = peft_model.get_prompt(batch_size=1)
    v = config.num_virtual_tokens
    tokens: list[int] = []
    step_ids = ids
    past = v
    for _ in range(max_new_tokens):
        n = step_ids.shape[1]
        mask = torch.ones(1, past + n, dtype=torch.long, device=TEST_DEVICE)
        pos = torch.arange(past, past + n, device=TEST_DEVICE).unsqueeze(0)
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **{cache_kwarg(model): cache}).logits
        seen = torch.cat([ids, torch.tensor([tokens], dtype=torch.long, device=TEST_DEVICE)], 1) if tokens else ids
        nxt = int(processors(seen, logits[:, -1].float())[0].argmax())
        tokens.append(nxt)
        past += n
        step_ids = torch.tensor([[nxt]], device=TEST_DEVICE)
    return tokens


@torch.no_grad()
def reference_greedy_nocache(base_dir, prompts: list[str], adapter_dir: Path | None,
                             max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens for each prompt alone on the fp32 model, stopping before the first EOS; each step is one
    full forward over the prompt and the tokens so far, so nothing depends on a cache carried between steps
    (a sliding-window layer's cache may drop entries): plain transformers for the base, PEFT's model for
    LoRA, and for prefix tuning PEFT's own ``get_prompt()`` key/values as the only past, positions counted
    after them as PEFT counts them. The model is loaded once for all ``prompts``."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = _load_base(base_dir, "none", TEST_DEVICE)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else None
    virtual = 0
    if adapter_dir and PeftConfig.from_pretrained(adapter_dir).peft_type == "PREFIX_TUNING":
        virtual = PeftConfig.from_pretrained(adapter_dir).num_virtual_tokens
    answers = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(TEST_DEVICE)
        start = ids.shape[1]
        for _ in range(max_new_tokens):
            logits = _full_forward(model, peft_model, ids, virtual)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        tokens = ids[0, start:].tolist()
        answers.append(tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens)
    return answers


def _full_forward(model, peft_model, ids: torch.Tensor, virtual: int) -> torch.Tensor:
    n = ids.shape[1]
    if virtual:  # the prefix as the past: a fresh cache each step
        mask = torch.ones(1, virtual + n, dtype=torch.long, device=ids.device)
        positions = torch.arange(virtual, virtual + n, device=ids.device)[None]
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_kwarg(model): peft_model.get_prompt(batch_size=1)}).logits
    runner = peft_model if peft_model is not None else model
    return runner(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


# The ``adapterd`` command as a user types it (``python -m adapterd.cli`` is the same entry point), run from the
# repository root like every test: nothing there shadows the installed package.
CLI = [sys.executable, "-m", "adapterd.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def one_line_error(out: subprocess.CompletedProcess, flag: str) -> str:
    """Exit 2, no traceback, and one error line naming ``flag``; returns that line."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if re.search(r"error: | ERROR ", line)]
    assert len(errors) == 1 and flag in errors[0], out.stderr[-3000:]
    return errors[0]


class NVMLError(Exception):
    """The fake NVML's error (pynvml.NVMLError)."""


def fake_pynvml(fail_power: bool) -> types.ModuleType:
    """A stand-in for pynvml: two devices (NVML indices 0 and 1, UUIDs GPU-0 and GPU-1), 87% busy, 3 of 80 GiB
    used, 61 degrees, 250.5 W; with ``fail_power``, device 1 does not report power."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = NVMLError
    nv.NVML_TEMPERATURE_GPU = 0
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=10)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=0)
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 61

    def power(h):
        if fail_power and h == 1:
            raise NVMLError("not supported")
        return 250_500  # milliwatts
    nv.nvmlDeviceGetPowerUsage = power
    return nv
