"""serve_bench's correctness figures: the engine's greedy tokens against its own other paths and against
reference models (transformers, PEFT, the dequantized int8 weights), and the oracle models themselves
(the engine's kernel swaps and LoRA wrappers taken back out of the shared base model)."""

from __future__ import annotations

from pathlib import Path

import torch
from engine_run import engine_run


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """The reference: transformers ``generate`` (greedy), one prompt at a time, before the engine touches the
    model (the engine may swap in its own int8 kernel)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(tokens[0, len(prompt):].tolist())
    return out


def rows_agreement(first: list[list[int]], second: list[list[int]], new: int) -> tuple[float, float]:
    """(share of rows whose tokens are all equal, share of tokens before each row's first divergence)."""
    same = sum(a == b for a, b in zip(first, second, strict=True)) / len(first)
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), new)
                 for a, b in zip(first, second, strict=True))
    return same, prefix / (new * len(first))


def agreement(runtime, prompts: list[list[int]], adapters: list, new: int,
              hf_tokens: list[list[int]]) -> tuple[float, float, float, list]:
    """Greedy tokens of the fast decode path (CUDA graphs, bucketed shapes) against the reference paths.

    Returns (share of rows whose tokens all equal the engine's eager exact-shape path's, share of tokens
    equal before the first divergence against it, share of base rows equal to HF ``generate`` alone; the
    base rows come first in ``prompts``), and the fast path's tokens. bf16/int8 arithmetic differs between
    shapes and kernels, so near-ties may flip a token; the shares say how often.
    """
    decoder = runtime.engine.runner.decoder
    graphs = decoder.use_graphs
    _, fast = engine_run(runtime, prompts, adapters, new)
    decoder.use_graphs = False
    try:
        _, eager = engine_run(runtime, prompts, adapters, new)
    finally:
        decoder.use_graphs = graphs
    fast_tokens = [f.tokens for f in fast]
    same_rows, tokens_same = rows_agreement(fast_tokens, [e.tokens for e in eager], new)
    hf_same = sum(hf == f for hf, f in zip(hf_tokens, fast_tokens, strict=False)) / len(hf_tokens)
    return same_rows, tokens_same, hf_same, fast_tokens


def batch_invariance(runtime, probes: list[list[int]], probe_adapters: list, fillers: list[list[int]],
                     filler_adapters: list, new: int) -> tuple[float, float]:
    """Each probe request served alone, then all of them in one batch with the filler rows (on other adapters):
    (share of probes whose greedy tokens are identical both ways, share of tokens before the first
    divergence). Both ways run the engine's fast path as the daemon does (graphs and buckets on a GPU): only
    the batch around a row changes, so anything below 100% is a kernel whose result depends on the batch
    (split-K choices, matmul algorithms picked per row count, attention over another bucket)."""
    alone = [engine_run(runtime, [p], [a], new)[1][0].tokens for p, a in zip(probes, probe_adapters, strict=True)]
    _, batched = engine_run(runtime, probes + fillers, probe_adapters + filler_adapters, new)
    return rows_agreement(alone, [s.tokens for s in batched[: len(probes)]], new)


# ------------------------------------------------------------------------------- serve_bench's checks

class Checks:
    """The correctness requests of one quantization: 4 base rows then 4 LoRA rows (adapters 0-3), and
    transformers' greedy tokens for the base rows, taken before any engine touched the model."""

    def __init__(self, model, ctx: int, new: int) -> None:
        g = torch.Generator().manual_seed(1234)  # the same prompts every run: figures of two runs compare
        self.prompts = [list(torch.randint(10, 1000, (ctx,), generator=g).tolist()) for _ in range(8)]
        self.hf_tokens = hf_greedy(model, self.prompts[:4], new)
        self.probe_order = (0, 4, 1, 5, 2, 6, 3, 7)  # batch-invariance probes: base and LoRA rows alternate


def measure_tokens(runtime, ids: list[str], args, label: str, checks: Checks, table) -> list[list[int]]:
    """The fast path against the eager path and HF, then batch invariance; returns the fast path's tokens of
    the check requests."""
    adapters = [runtime.store.get(a) for a in ids[: args.batch]]
    mix = [None] * 4 + adapters[:4]
    rows_same, tokens_same, hf_same, fast = agreement(runtime, checks.prompts, mix, args.new, checks.hf_tokens)
    table.note(f"  fast path vs eager path, {label}, 4 base + 4 LoRA rows", f"rows identical {rows_same:.0%}",
               f"tokens before divergence {tokens_same:.0%}; base rows = HF generate {hf_same:.0%}")
    probes = checks.probe_order[: min(8, args.batch // 2)]
    fill = args.batch - len(probes)
    others = adapters[4:]  # adapters no probe uses
    fillers = [list(torch.randint(10, 1000, (args.ctx,)).tolist()) for _ in range(fill)]
    same, before = batch_invariance(runtime, [checks.prompts[i] for i in probes], [mix[i] for i in probes],
                                    fillers, [others[i % len(others)] for i in range(fill)], args.new)
    table.note(f"  batch invariance, {label}: {len(probes)} requests alone vs in {args.batch} rows",
               f"identical {same:.0%}", f"tokens before divergence {before:.0%} (others on other adapters)")
    table.note(f"  decode graphs captured, {label}", str(runtime.engine.runner.decoder.captures), "")
    return fast


def judge(model, dtype: torch.dtype, bnb_layers: dict, checks: Checks, fast: list[list[int]], lora_dirs: list[Path],
          label: str, table) -> None:
    """The fast path's tokens judged teacher-forced: base rows by the plain model, LoRA rows by PEFT on it; for
    int8 first by the dequantized weights (the kernel's exact math), then by bitsandbytes' own matmul."""
    def both(oracle: str) -> None:
        exact, within = oracle_agreement(model, checks.prompts[:4], fast[:4])
        table.note(f"  fast-path base rows, {label}, judged by {oracle} (teacher-forced)", f"top token {exact:.0%}",
                   f"within 1% of the logit range of the top {within:.0%}")
        exact, within = peft_agreement(model, checks.prompts[4:], fast[4:], lora_dirs)
        table.note(f"  fast-path LoRA rows, {label}, judged by PEFT on {oracle} (teacher-forced)",
                   f"top token {exact:.0%}", f"within 1% of the logit range of the top {within:.0%}")

    if bnb_layers:
        put_back(model, dequantized(bnb_layers, dtype))
        both("the dequantized int8 weights")
        put_back(model, bnb_layers)
    both("bitsandbytes" if bnb_layers else "transformers")


# ------------------------------------------------------------------------------- the oracle models

def bnb_int8_layers(model) -> dict[str, torch.nn.Module]:
    """The model's bitsandbytes int8 layers by name, to put back after the engine swapped in its kernel."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def dequantized(layers: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Plain linears holding each int8 layer's dequantized weight (``CB * SCB / 127``): the exact math of the
    weight-only kernel, computed by cuBLAS. The fair oracle for it; bitsandbytes also rounds activations."""
    from adapterd.server.kernels import Int8WeightOnlyLinear

    out = {}
    for name, layer in layers.items():
        int8 = Int8WeightOnlyLinear.from_bnb(layer)
        linear = torch.nn.Linear(int8.in_features, int8.out_features, bias=layer.bias is not None,
                                 device=int8.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(int8.weight.data.float() * (int8.scb.float()[:, None] / 127))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        out[name] = linear
    return out


def hf_norms(model) -> dict[str, torch.nn.Module]:
    """transformers' own RMSNorm modules by name, to put back after the engine swapped in its fused one."""
    from adapterd.server.kernels.rms_norm import FUSABLE_NORMS

    return {n: m for n, m in model.named_modules() if type(m).__name__ in FUSABLE_NORMS}


def put_back(model, layers: dict[str, torch.nn.Module]) -> None:
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        current = getattr(parent, child)
        if hasattr(current, "base_layer"):  # wrapped by the engine's batched LoRA layer
            current.base_layer = layer
        else:
            setattr(parent, child, layer)


def unwrap_lora(model) -> int:
    """Replace the engine's batched LoRA layers by their base layers (after its runtime closed), so that PEFT
    can wrap the model and the next runtime starts from the plain model. Returns how many were unwrapped."""
    from adapterd.server.adapters.lora import BatchedLoraLinear

    wrapped = {n: m.base_layer for n, m in model.named_modules() if isinstance(m, BatchedLoraLinear)}
    for name, base_layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base_layer)
    return len(wrapped)


# ------------------------------------------------------------------------------- teacher-forced judging

@torch.no_grad()
def _judge_row(model, prompt: list[int], out: list[int], tolerance: float) -> tuple[int, int]:
    """Positions of ``out`` where the token is the model's top token, and where it is within ``tolerance`` x
    (the position's logit range) of it."""
    ids = torch.tensor([prompt + out], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(out)].float()
    chosen_ids = torch.tensor(out, device=logits.device)
    chosen = logits.gather(1, chosen_ids[:, None])[:, 0]
    top, bottom = logits.max(-1).values, logits.min(-1).values
    return int((logits.argmax(-1) == chosen_ids).sum()), int((top - chosen <= tolerance * (top - bottom)).sum())


def oracle_agreement(model, prompts: list[list[int]], outputs: list[list[int]],
                     tolerance: float = 0.01) -> tuple[float, float]:
    """The fast path's tokens judged by the reference model, teacher-forced (so one flip does not derail
    the rest): the share of positions where the token is the reference's top token, and where its
    reference logit is within ``tolerance`` x (the position's logit range) of the top one (a near-tie that
    bf16 or int8 arithmetic may resolve either way)."""
    counts = [_judge_row(model, p, o, tolerance) for p, o in zip(prompts, outputs, strict=True)]
    total = sum(len(o) for o in outputs)
    return sum(c[0] for c in counts) / total, sum(c[1] for c in counts) / total


def peft_agreement(model, prompts: list[list[int]], outputs: list[list[int]], adapter_dirs: list[Path],
                   tolerance: float = 0.01) -> tuple[float, float]:
    """``oracle_agreement`` for LoRA rows: each row judged by PEFT with that row's adapter on ``model`` (the
    plain base: ``unwrap_lora`` first); the model is left unwrapped again."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=adapter_dirs[0].name)
    try:
        counts = []
        for prompt, out, adapter_dir in zip(prompts, outputs, adapter_dirs, strict=True):
            if adapter_dir.name not in peft_model.peft_config:
                peft_model.load_adapter(adapter_dir, adapter_name=adapter_dir.name)
            peft_model.set_adapter(adapter_dir.name)
            counts.append(_judge_row(peft_model, prompt, out, tolerance))
    finally:
        peft_model.unload()
    total = sum(len(o) for o in outputs)
    return sum(c[0] for c in counts) / total, sum(c[1] for c in counts) / total
