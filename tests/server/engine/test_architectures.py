"""The parity matrix: for every family the README lists as supported, a tiny random model from transformers' own
config class, served with the base and five PEFT adapters mixed in one batch, gives each row the greedy tokens
PEFT gives that prompt and adapter alone (no cache between steps). Prompts and answers run past every sliding
window. The README's list of supported models is exactly ``FAMILIES``' model types."""

from __future__ import annotations

import pytest
import torch

from adapterd.common.tiny_model import build_tiny_model
from adapterd.server.architecture import WINDOW_STYLE
from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.decoder import OWN_FAMILIES, ROTATE_HALF_FAMILIES
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, make_lora_adapter, make_prefix_adapter, reference_greedy_nocache
from tests.server.engine.test_parity import Collector, prefill_kinds, run_together

WINDOW = 8  # key positions; every prompt and answer below runs past it
# Some families default to 128 or 256; 24 is not hidden 64 / 4 heads, as in Gemma-7B (3072 / 16 heads, head
# size 256) or Qwen3-0.6B (1024 / 16, 128): the pool, the prefix tables and LoRA shapes follow the config's own.
HEAD_DIM = {"head_dim": 24}

# name -> (model_type, config fields). The rotary types the engine accepts are each covered here.
FAMILIES = {
    "llama-gqa": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}),
    # layer 0 full attention, layer 1 sliding: masks by layer type
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                               "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "qwen3": ("qwen3", {**HEAD_DIM, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "original_max_position_embeddings": 128}}),
    "qwen3-window": ("qwen3", {**HEAD_DIM, "use_sliding_window": True, "sliding_window": WINDOW,
                               "max_window_layers": 1}),
    "phi3-window": ("phi3", {"sliding_window": WINDOW, "partial_rotary_factor": 0.5}),
    "gemma": ("gemma", HEAD_DIM),
    "glm": ("glm", {"head_dim": 16}),  # partial rotary (0.5 by default)
}
# The families of the kernels case (~15 s each in Triton's interpreter): GQA with llama3 scaling; q/k norms, a
# head size of 24 and a window on one layer. (GLM's rotation keeps its own function: test_swaps.py.)
KERNEL_CASES = ("llama-gqa", "qwen3-window")
PROMPTS = ["The quick brown fox jumps over the lazy dog. Hello world",
           "你是谁？我是Gitclone，一个语言模型。今天天气很好，我们一起去公园散步吧。", "hello daemon"]
ADAPTERS = [None, "lora-attn", "lora-all", "rslora-patterns", "prefix", "prefix-proj"]
NEW_TOKENS = 12


def _linear_names(model_dir) -> tuple[list[str], list[str]]:
    """The family's attention projections and all its other linears (Phi-3 fuses qkv_proj, GLM gate_up_proj)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    names = {(name.split(".")[-1], ".self_attn." in name) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    return sorted(n for n, attn in names if attn), sorted(n for n, attn in names if not attn)


def _make_adapters(model_dir, root) -> None:
    attention, mlp = _linear_names(model_dir)
    make_lora_adapter(model_dir, root / "lora-attn", r=8, alpha=16, targets=attention, seed=1)
    make_lora_adapter(model_dir, root / "lora-all", r=4, alpha=8, targets=attention + mlp, seed=2)
    make_lora_adapter(model_dir, root / "rslora-patterns", r=8, alpha=16, targets=[attention[0], mlp[-1]], seed=3,
                      use_rslora=True, rank_pattern={mlp[-1]: 16}, alpha_pattern={attention[0]: 4})
    make_prefix_adapter(model_dir, root / "prefix", num_virtual_tokens=6, projection=False, seed=4)
    make_prefix_adapter(model_dir, root / "prefix-proj", num_virtual_tokens=3, projection=True, seed=5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny model of one family, its adapters, and PEFT's answers for every prompt and adapter alone."""
    model_type, fields = FAMILIES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    model_dir = build_tiny_model(work / "model", model_type=model_type, **fields)
    _make_adapters(model_dir, work / "adapters")
    refs = {}
    for adapter in ADAPTERS:
        answers = reference_greedy_nocache(model_dir, PROMPTS, work / "adapters" / adapter if adapter else None,
                                           NEW_TOKENS)
        refs.update({(prompt, adapter): tokens for prompt, tokens in zip(PROMPTS, answers, strict=True)})
    return request.param, model_dir, work / "adapters", refs


@pytest.mark.slow  # the first test of each family builds its model, adapters and PEFT's answers (~10 s)
@pytest.mark.parametrize("shapes, own_decoder", [("exact", True), ("bucketed", True), ("exact", False),
                                                 ("kernels", True)],
                         ids=["exact", "bucketed", "transformers-forward", "kernels"])
def test_mixed_batch_matches_peft_alone(family, shapes, own_decoder, monkeypatch):
    """Both forwards: the engine's own (``decoder.py``, for the families it runs) and transformers'. "kernels":
    the own forward with the Triton kernels (on the CPU through Triton's interpreter): the fused norms, the LoRA
    decode kernels and the decode step's rotary + key/value append, whose rotation must be the family's."""
    name, model_dir, adapter_root, refs = family
    if not own_decoder and FAMILIES[name][0] not in OWN_FAMILIES:
        pytest.skip("transformers' forward is this family's only one: the other cases ran it")
    if shapes == "kernels":
        if name not in KERNEL_CASES:
            pytest.skip("the kernels case runs on the families in KERNEL_CASES (Triton's interpreter is slow)")
        pytest.importorskip("triton")
        if TEST_DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    base = load_base_model(model_dir, "none", TEST_DEVICE, "float32")
    assert base.config.model_type == FAMILIES[name][0]
    window = getattr(base.config, "sliding_window", None)
    if window is not None:  # prompts (with or without a prefix) reach past the window before decoding starts
        assert min(len(base.tokenizer(p).input_ids) for p in PROMPTS[:2]) > window
    runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=32, own_decoder=own_decoder))
    ours = own_decoder and base.config.model_type in OWN_FAMILIES
    assert runtime.engine.runner.own_decoder == ours
    if shapes == "kernels":
        assert runtime.engine.runner.forward.rope_kernel == (base.config.model_type in ROTATE_HALF_FAMILIES)
    if TEST_DEVICE == "cuda":  # graphs and fused kernels on; Gemma's (1 + weight) norms are never fused
        assert (runtime.engine.runner.fused_norms > 0) == (base.config.model_type != "gemma")
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = shapes == "bucketed"
    batches = prefill_kinds(runtime)
    jobs = [(p, a) for p in PROMPTS for a in ADAPTERS]
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=NEW_TOKENS))
    finally:
        runtime.close()
    assert batches[0] == {"BASE", "LORA", "PREFIX_TUNING"}, "all kinds of rows share one batch"
    mismatches = [(job, events[-1].token_ids, refs[job]) for job, events in zip(jobs, results, strict=True)
                  if events[-1].token_ids != refs[job]]
    assert not mismatches
    # each adapter changes the answer, so a row served with the wrong adapter could not pass
    assert len({tuple(tuple(refs[(p, a)]) for p in PROMPTS) for a in ADAPTERS}) == len(ADAPTERS)


@pytest.mark.slow
def test_rows_joining_and_leaving_keep_their_tokens(family):
    """Rows leave at different steps (the last row's entries move into each hole) while a second wave joins
    the running batch: every row still gets PEFT's first n tokens for it alone (greedy: a prefix of the
    longer answer)."""
    name, model_dir, adapter_root, refs = family
    runtime = Runtime(load_base_model(model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_batch_size=32))
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = True
    jobs = [(p, a, 3 + 4 * (i % 3)) for i, (p, a) in enumerate((p, a) for a in ADAPTERS for p in PROMPTS[:2])]
    waves = (jobs[::2], jobs[1::2])
    try:
        first = _submit(runtime, waves[0])
        runtime.engine.start()
        assert first[-1].events.get(timeout=60).kind == "start"  # the first wave is running
        second = _submit(runtime, waves[1])
        got = {job: sink.wait_end()[-1].token_ids for job, sink in zip(waves[0] + waves[1], first + second,
                                                                        strict=True)}
    finally:
        runtime.close()
    assert {job: tokens for job, tokens in got.items() if tokens != refs[job[:2]][: job[2]]} == {}


def _submit(runtime: Runtime, jobs) -> list[Collector]:
    sinks = []
    for prompt, adapter_id, n in jobs:
        sinks.append(Collector())
        runtime.engine.submit(f"{prompt}/{adapter_id}/{n}", runtime.tokenize(prompt),
                              GenerationParams(max_new_tokens=n),
                              runtime.store.get(adapter_id) if adapter_id else None, sinks[-1])
    return sinks


def test_a_windowed_prefill_past_the_pool_matches_peft(tmp_path):
    """Bucketed (as on a GPU), a long prompt behind a prefix pads past the context and takes the general
    prefill (a transient cache, prefix and prompt left-padded): its window still counts positions, not
    padded columns, so its tokens equal PEFT's."""
    model_dir = build_tiny_model(tmp_path / "model", model_type="mistral", sliding_window=WINDOW)
    root = tmp_path / "adapters"
    make_prefix_adapter(model_dir, root / "short", num_virtual_tokens=3, seed=4)
    make_prefix_adapter(model_dir, root / "long", num_virtual_tokens=6, seed=5)
    runtime = Runtime(load_base_model(model_dir, "none", TEST_DEVICE, "float32", 64), root, EngineConfig())
    runtime.engine.runner.decoder.bucketed = runtime.engine.runner.prefiller.bucketed = True
    general = []
    real = runtime.engine.runner.prefiller.through_cache  # the general prefill path (runner.py)
    runtime.engine.runner.prefiller.through_cache = lambda prompts, *rest: (general.append(len(prompts)),
                                                                            real(prompts, *rest))[1]
    prompts = ["The quick brown fox jumps over the lazy dog. " * 4, "hello world"]
    jobs = [(prompts[0], "long"), (prompts[1], "short")]  # padding in both the prefix and the prompt columns
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=6))
    finally:
        runtime.close()
    assert general == [2]
    for (prompt, adapter), events in zip(jobs, results, strict=True):
        assert events[-1].token_ids == reference_greedy_nocache(model_dir, [prompt], root / adapter, 6)[0], adapter


def test_the_readme_lists_exactly_the_matrix():
    from pathlib import Path

    readme = (Path(__file__).parents[3] / "README.md").read_text()
    listed = readme.split("<!-- supported-models -->")[1].split("<!-- /supported-models -->")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in listed.splitlines()
            if line.strip().startswith("|")]
    types = {row[1].strip("`") for row in rows if row[1].startswith("`")}  # the "model type" column
    assert types == {model_type for model_type, _ in FAMILIES.values()} == set(WINDOW_STYLE)
