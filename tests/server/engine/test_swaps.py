"""The engine's kernel swaps: which modules they replace, when they stay off, and that the engine with its
fused kernels still gives PEFT's tokens (on the CPU through Triton's interpreter; on a GPU compiled)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.swaps import use_fused_norms, use_int8_kernel
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import run_together

triton = pytest.importorskip("triton")


def _norm_classes(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__}


def test_fused_norms_swap_every_rmsnorm_only_when_enabled_and_available(tiny_model_dir, monkeypatch):
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32")
    layers = base.num_layers
    assert use_fused_norms(base, enabled=False) == 0
    if TEST_DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert use_fused_norms(base, enabled=True) == 0  # no GPU, no interpreter: transformers' norms stay
        assert _norm_classes(base.model) == {"LlamaRMSNorm"}
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_fused_norms(base, enabled=True) == 2 * layers + 1  # two a layer, and the final norm
    assert _norm_classes(base.model) == {"FusedRMSNorm"}


def test_int8_kernel_stays_off_when_disabled(tiny_model_dir, monkeypatch):
    """--no-int8-kernel keeps bitsandbytes' layers even where the kernel could run (here: the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    base = load_base_model(tiny_model_dir, "int8", TEST_DEVICE, "float32")
    bnb_layers = [m for m in base.model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert bnb_layers
    assert use_int8_kernel(base, enabled=False) == 0
    assert [m for m in base.model.modules() if type(m).__name__ == "Linear8bitLt"] == bnb_layers


def test_engine_with_fused_kernels_gives_pefts_tokens(tiny_model_dir, adapter_root, monkeypatch):
    """Fused RMSNorm in every norm (with the residual add before it), the BGMV kernels for the LoRA rows of
    each decode step (their shrinks in a launch of their own, or in the split-K matmul's), the rotary + key/value
    append kernel and the split-K attention in every decode step's layers and the MLP's SiLU * up kernel, in a
    batch that mixes base rows and two LoRA adapters: every row's greedy tokens equal PEFT's for it alone."""
    if TEST_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompts, adapters, new = ["hello world", "你是谁？"], [None, "lora-qv", "team/lora-all"], 6
    jobs = [(p, a) for p in prompts for a in adapters]
    refs = {job: reference_greedy(tiny_model_dir, job[0], adapter_root / job[1] if job[1] else None, new)
            for job in jobs}
    kernel_calls = []
    from adapterd.server.kernels import int8_shrink, lora_bgmv, rope_append

    # every BGMV path but o_proj's (whose shrink is the attention's merge) starts with a shrink, looked up at each
    # call: BGMV's own launch, or extra programs of the split-K matmul's (dense_splitk.IN_DECODE, over this float
    # base) where that launch ran (not None)
    real = lora_bgmv.lora_shrink
    monkeypatch.setattr(lora_bgmv, "lora_shrink", lambda *a, **k: (kernel_calls.append(1), real(*a, **k))[1])
    real_in_launch = int8_shrink.matmul_and_shrink

    def counted_in_launch(*args, **kwargs):
        done = real_in_launch(*args, **kwargs)
        if done is not None:
            kernel_calls.append(1)
        return done

    monkeypatch.setattr(int8_shrink, "matmul_and_shrink", counted_in_launch)
    rope_calls, add_norm_calls, act_calls, attention_calls = [], [], [], []
    real_rope = rope_append.rope_append
    # each call's LoRA deltas (q, k and v's, added by the rotary kernel: no expand launch of their own) or None
    monkeypatch.setattr(rope_append, "rope_append", lambda *a: (rope_calls.append(a[8:]), real_rope(*a))[1])
    from adapterd.server.kernels import decode_attention, silu_mul

    real_act = silu_mul.silu_mul
    monkeypatch.setattr(silu_mul, "silu_mul", lambda *a: (act_calls.append(1), real_act(*a))[1])
    real_attention = decode_attention.decode_attention
    # This test checks the kernel's tokens: on a GPU, the tiny model's grouped heads at 6 rows would go to SDPA
    # (faster there past MAX_GQA_ROWS, a choice test_decode_attention.py checks)
    monkeypatch.setattr(decode_attention, "MAX_GQA_ROWS", 256)
    monkeypatch.setattr(decode_attention, "decode_attention",  # each call's o_proj LoRA shrink, or None
                        lambda *a, **k: (attention_calls.append(k.get("shrink")), real_attention(*a, **k))[1])
    from adapterd.server.kernels import rms_norm

    real_add_norm = rms_norm.fused_add_rms_norm
    monkeypatch.setattr(rms_norm, "fused_add_rms_norm", lambda *a: (add_norm_calls.append(1), real_add_norm(*a))[1])
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32")
    runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=8, fused_kernels=True))
    assert runtime.engine.runner.fused_norms == 2 * base.num_layers + 1
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=new))
    finally:
        runtime.close()
    assert kernel_calls, "the LoRA rows' decode steps must run their shrinks (BGMV's, or in the matmul's launch)"
    assert runtime.engine.runner.forward.rope_kernel
    assert rope_calls, "decode steps must rotate and append through the rotary kernel"
    assert any(lora and lora[0] is not None for lora in rope_calls), "q/k/v deltas must go through the rotary kernel"
    assert add_norm_calls, "the residual adds must go through the fused add + norm kernel"
    assert act_calls, "the MLP's SiLU and product must go through their one kernel"
    assert attention_calls, "decode steps must attend through the split-K decode attention kernel"
    assert any(attention_calls), "o_proj's LoRA shrink must run in the attention's merge"
    assert {job: events[-1].token_ids for job, events in zip(jobs, results, strict=True)} == refs


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", ("LlamaRMSNorm",)), ("mistral", ("MistralRMSNorm",)), ("qwen2", ("Qwen2RMSNorm",)),
    ("qwen3", ("Qwen3RMSNorm",)), ("phi3", ("Phi3RMSNorm",)), ("glm", ("GlmRMSNorm",)), ("gemma", ()),
])
def test_only_norms_with_llamas_math_are_fused(model_type, expected, monkeypatch):
    """The fused kernel computes Llama's RMSNorm; Gemma's scales by (1 + weight) and casts after the product,
    so its norms must stay transformers' own (swapping them would serve wrong answers silently)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterd.server.engine.swaps import fusable_norms

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    assert fusable_norms(model) == expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel "runs" here too: the swap itself is checked
    before = _norm_classes(model)
    base = SimpleNamespace(model=model, device=torch.device(TEST_DEVICE))  # all use_fused_norms reads
    swapped = use_fused_norms(base, enabled=True)
    assert (swapped > 0) == bool(expected)
    assert _norm_classes(model) == ({"FusedRMSNorm"} if expected else before)


@pytest.mark.parametrize(("model_type", "fused_kernels", "expected"), [
    ("llama", True, True), ("llama", False, False), ("qwen3", True, True), ("glm", True, False),
])
def test_rotary_kernel_only_for_llamas_rotation_and_only_when_enabled(model_type, fused_kernels, expected,
                                                                     monkeypatch):
    """The decode step's rotary + append kernel computes Llama's rotate_half over the whole head: GLM's
    interleaved half-head rotation keeps its own function, and --no-fused-kernels turns the kernel off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterd.server.engine.decoder import Decoder

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).to(TEST_DEVICE)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Decoder(model, rope_kernel=fused_kernels).rope_kernel == expected
    if TEST_DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not Decoder(model).rope_kernel  # no GPU, no interpreter: transformers' rotation
