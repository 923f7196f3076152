"""Serving speed: adapterd's engine against transformers + PEFT, measured in the same run.

On the GPU machine (``--shape llama2-7b``, the default there) it builds a Llama-2-7B-shaped model with random
bf16 weights (no download), saves it once, and measures for each quantization:

1. batch-1 decode time per token at 512 tokens of context (engine and HF ``generate``), and the roofline
   (weight bytes + live KV bytes over the measured device-copy bandwidth);
2. batch-32 decode throughput: base only; 32 rows on 32 distinct LoRA adapters (r=16 on q,k,v,o); PEFT's
   mixed batch (``adapter_names``, 8 adapters);
3. time to first token for a 512-token prompt;
4. cold adapter load, disk to device slot, r=16 (p50 and p95 over 20 adapters) against PEFT's load_adapter.

``--shape tiny`` runs the same measurements on a small model on the CPU (a regression guard: ratios only).
Every run appends its table to bench/RESULTS.md with commit, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from results_table import git_commit

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                 intermediate_size=688, vocab_size=2000, max_position_embeddings=2048),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_model_dir(path: Path, shape: str, device: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterd.common.tiny_model import build_tokenizer

    if (path / "config.json").is_file():
        return path
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(1024).save_pretrained(path)
    del model
    return path


def make_lora_dirs(root: Path, base_dir: Path, n: int, rank: int = 16) -> list[str]:
    """n PEFT-format LoRA adapters (r, q/k/v/o, bf16 weights as PEFT would save them after training)."""
    from safetensors.torch import save_file

    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out_dims = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    ids = []
    for i in range(n):
        d = root / f"lora{i:03d}"
        ids.append(d.name)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for m in LORA_TARGETS:
                key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, hidden, generator=g) * 0.01).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out_dims[m], rank, generator=g) * 0.01).to(
                    torch.bfloat16)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(LORA_TARGETS), "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": str(base_dir), "inference_mode": True}))
    return ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 10 / (time.perf_counter() - t)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


# ---------------------------------------------------------------------------------------------- baselines

def hf_decode_ms(model, batch: int, ctx: int, new: int, device, **gen_kwargs) -> float:
    """Per-token decode time of ``generate`` (time for ``new`` tokens minus time for 1, over new - 1)."""
    ids = torch.randint(10, 1000, (batch, ctx), device=device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, **gen_kwargs)
        sync(device)
        return time.perf_counter() - t

    timed(2)
    return (timed(new) - timed(1)) / (new - 1) * 1000


# ------------------------------------------------------------------------------------------------- engine

class Timeline:
    """A sink that records when each event of one request arrived."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self.tokens: list[int] = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.times.append((event.kind, time.perf_counter()))
        if event.kind == "end":
            self.tokens = list(event.token_ids)
            self.done.set()


def engine_run(runtime, prompts: list[list[int]], adapters: list, new: int) -> tuple[float, list[Timeline]]:
    """Submit all requests at once; return tokens/s over the decode steps and each request's timeline."""
    from adapterd.server.engine import GenerationParams
    from adapterd.server.engine.observer import EngineObserver

    steps: list[tuple[int, float]] = []

    class Steps(EngineObserver):
        def decode_step(self, rows, seconds):
            steps.append((len(rows), seconds))

    observer = Steps()
    runtime.engine.observers.add(observer)
    params = GenerationParams(max_new_tokens=new, min_new_tokens=new)
    sinks = []
    # Hold the engine thread while submitting, so that every request is admitted in the same step and two
    # runs of the same requests see the same batch shapes.
    gate = threading.Event()
    runtime.engine.call(lambda: gate.wait(60))
    for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        sink = Timeline()
        runtime.engine.submit(f"b{time.perf_counter_ns()}-{i}", ids, params, adapter, sink)
        sinks.append(sink)
    gate.set()
    for s in sinks:
        s.done.wait(600)
    runtime.engine.observers.observers.remove(observer)
    # The median step with every row present: robust to the first steps' warm-up and to host-side jitter.
    full = [s for n, s in steps if n == len(prompts)]
    return len(prompts) / statistics.median(full), sinks


def engine_step_ms(runtime, batch: int, ctx: int, new: int, adapters: list) -> float:
    prompts = [list(torch.randint(10, 1000, (ctx,)).tolist()) for _ in range(batch)]
    tok_s, _ = engine_run(runtime, prompts, adapters, new)
    return batch / tok_s * 1000


def ttft_ms(runtime, ctx: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        prompt = [list(torch.randint(10, 1000, (ctx,)).tolist())]
        t = time.perf_counter()
        _, (sink,) = engine_run(runtime, prompt, [None], 2)
        first_delta = next(when for kind, when in sink.times if kind in ("delta", "end"))
        times.append((first_delta - t) * 1000)
    return statistics.median(times)


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


def agreement(runtime, prompts: list[list[int]], adapters: list, new: int,
              hf_tokens: list[list[int]]) -> tuple[float, float, float, list]:
    """Greedy tokens of the fast decode path (CUDA graphs, bucketed shapes) against the reference paths.

    Returns (share of rows whose tokens all equal the engine's eager exact-shape path's, share of tokens
    equal before the first divergence against it, share of base rows equal to HF ``generate`` alone; the
    base rows come first in ``prompts``). bf16/int8 arithmetic differs between shapes and kernels, so
    near-ties may flip a token; the shares say how often.
    """
    decoder = runtime.engine.runner.decoder
    graphs = decoder.use_graphs
    _, fast = engine_run(runtime, prompts, adapters, new)
    decoder.use_graphs = False
    try:
        _, eager = engine_run(runtime, prompts, adapters, new)
    finally:
        decoder.use_graphs = graphs
    same_rows = sum(f.tokens == e.tokens for f, e in zip(fast, eager, strict=True)) / len(prompts)
    prefix = 0
    for f, e in zip(fast, eager, strict=True):
        prefix += next((i for i, (a, b) in enumerate(zip(f.tokens, e.tokens, strict=False)) if a != b), new)
    hf_same = sum(hf == f.tokens for hf, f in zip(hf_tokens, fast, strict=False)) / len(hf_tokens)
    return same_rows, prefix / (new * len(prompts)), hf_same, [f.tokens for f in fast]


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


@torch.no_grad()
def oracle_agreement(model, prompts: list[list[int]], outputs: list[list[int]],
                     tolerance: float = 0.01) -> tuple[float, float]:
    """The fast path's tokens judged by the reference model, teacher-forced (so one flip does not derail
    the rest): the share of positions where the token is the reference's top token, and where its
    reference logit is within ``tolerance`` x (the position's logit range) of the top one (a near-tie that
    bf16 or int8 arithmetic may resolve either way)."""
    exact = within = total = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt + out], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(out)].float()
        chosen = logits.gather(1, torch.tensor(out, device=logits.device)[:, None])[:, 0]
        top, bottom = logits.max(-1).values, logits.min(-1).values
        exact += int((logits.argmax(-1) == torch.tensor(out, device=logits.device)).sum())
        within += int((top - chosen <= tolerance * (top - bottom)).sum())
        total += len(out)
    return exact / total, within / total


def cold_loads_ms(runtime, ids: list[str]) -> tuple[list[float], list[float]]:
    """Disk to device slot: read + validate + copy into a slot, synchronized. Returns the totals and, of
    each, the part spent before the slot fill (reading, validating, packing into pinned host memory).

    Each adapter is unloaded first and the engine has evicted it before the clock starts, so its host buffer
    is back in the store's buffer pool, as in the daemon when a budget unloads an adapter before a cold load
    (the caller must hold no reference to the loaded adapters, or their buffers stay lent)."""
    totals, reads = [], []
    for adapter_id in ids:
        runtime.store.unload(adapter_id)
        runtime.engine.call(lambda: None).result(60)  # the eviction queued by unload has run
        sync(runtime.base.device)
        t = time.perf_counter()
        adapter = runtime.store.load(adapter_id)
        read = time.perf_counter()

        def fill(a=adapter):
            slot = runtime.engine.runner.slots.acquire(a.key, a.lora)
            runtime.engine.runner.slots.release(slot)
            sync(runtime.base.device)

        runtime.engine.call(fill).result(60)
        totals.append((time.perf_counter() - t) * 1000)
        reads.append((read - t) * 1000)
    return totals, reads


def replay_ms(runtime, batch: int) -> float | None:
    """Device time of one decode step: a captured graph of this batch bucket (no LoRA) replayed alone, with
    no host work between replays. The engine's step time minus this is the host's share."""
    cache = runtime.engine.runner.decoder.graphs
    keys = [k for k in cache.keys() if k[0] == batch and k[2] == 0]
    if not keys:
        return None
    graph, _ = cache.entry(max(keys))

    def timed() -> float:
        for _ in range(3):
            graph.replay()
        sync(runtime.base.device)
        t = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync(runtime.base.device)
        return (time.perf_counter() - t) / 20 * 1000

    return runtime.engine.call(timed).result(60)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# -------------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--quantizations", default="none,int8,nf4")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "adapterd-bench"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--own-decoder", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine's own decoder forward (off: transformers' forward), as `serve` takes it")
    args = parser.parse_args()

    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from adapterd.server.engine import EngineConfig
    from adapterd.server.engine.step_context import StepContext, step_context
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    adapter_root = work / "adapters"
    ids = make_lora_dirs(adapter_root, base_dir, max(args.batch, 20))
    bandwidth = copy_bandwidth(device)
    rows: list[tuple[str, str, str, str]] = []  # measure, baseline, adapterd, ratio/note

    def add(measure: str, baseline: float | None, ours: float, unit: str, better: str = "lower") -> None:
        ratio = "" if not baseline else (f"{baseline / ours:.2f}x" if better == "lower" else f"{ours / baseline:.2f}x")
        rows.append((measure, f"{baseline:.2f} {unit}" if baseline else "-", f"{ours:.2f} {unit}", ratio))
        print(f"{measure:55s} baseline {rows[-1][1]:>14s}  adapterd {rows[-1][2]:>14s}  {ratio}", flush=True)

    def note(measure: str, ours: str, ratio: str) -> None:
        rows.append((measure, "", ours, ratio))
        print(f"{measure:55s} {ours:>40s}  {ratio}", flush=True)

    for q in args.quantizations.split(","):
        base = load_base_model(base_dir, q, device=str(device))
        model = base.model
        label = {"none": str(base.dtype).removeprefix("torch."), "int8": "int8", "nf4": "nf4"}[q]
        hf_ms = hf_decode_ms(model, 1, args.ctx, args.new, device)
        check_prompts = [list(torch.randint(10, 1000, (args.ctx,)).tolist()) for _ in range(8)]
        hf_tokens = hf_greedy(model, check_prompts[:4], args.new)
        if q == "none":
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(model, adapter_root / ids[0], adapter_name=ids[0])
            for a in ids[1:8]:
                peft_model.load_adapter(adapter_root / a, adapter_name=a)
            names = [ids[i % 8] for i in range(args.batch)]
            peft_ms = hf_decode_ms(peft_model, args.batch, args.ctx, args.new, device, adapter_names=names)
            peft_load = []
            for a in ids[8:12]:
                sync(device)
                t = time.perf_counter()
                peft_model.load_adapter(adapter_root / a, adapter_name=a)
                sync(device)
                peft_load.append((time.perf_counter() - t) * 1000)
            model = peft_model.unload()
            base.model = model
        bnb_layers = bnb_int8_layers(model) if q == "int8" else {}
        norms = hf_norms(model)  # the engine swaps in its fused norm: the oracle below gets these back
        runtime = Runtime(base, adapter_root, EngineConfig(max_batch_size=max(64, args.batch), lora_slots=args.batch,
                                                           max_lora_rank=16, max_prefill_tokens=args.ctx * args.batch,
                                                           own_decoder=args.own_decoder))
        runtime.engine.start()
        try:
            engine_step_ms(runtime, 2, args.ctx, 8, [None, runtime.store.get(ids[0])])  # warm-up, not recorded
            ms = engine_step_ms(runtime, 1, args.ctx, args.new, [None])
            kv_bytes = 2 * base.num_layers * base.num_kv_heads * base.head_dim * args.ctx * 2
            floor = (weight_bytes(model) + kv_bytes) / bandwidth * 1000 if bandwidth else None
            add(f"batch-1 decode ms/token, {label}, ctx {args.ctx}", hf_ms, ms, "ms")
            device_ms = replay_ms(runtime, 1)
            if device_ms:
                note(f"  of which device (graph replayed alone), {label}", f"{device_ms:.2f} ms",
                     f"host {ms - device_ms:.2f} ms")
            if floor:
                note(f"  roofline {label} (weights + KV over copy bandwidth)", f"{floor:.2f} ms",
                     f"{floor / ms:.0%} of roofline")
            adapters = [runtime.store.get(a) for a in ids[: args.batch]]
            one = engine_step_ms(runtime, 1, args.ctx, args.new, adapters[:1])
            add(f"batch-1 decode ms/token, {label}, one LoRA r16", None, one, "ms")
            base_tps = 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new, [None] * args.batch) * args.batch
            mixed_tps = 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new, adapters) * args.batch
            add(f"batch-{args.batch} tok/s, {label}, base only", None, base_tps, "tok/s", "higher")
            device_ms = replay_ms(runtime, args.batch)
            if device_ms:
                note(f"  batch-{args.batch} step: device (graph replayed alone), {label}", f"{device_ms:.2f} ms",
                     f"engine step {args.batch / base_tps * 1000:.2f} ms")
            add(f"batch-{args.batch} tok/s, {label}, {args.batch} distinct LoRA", None, mixed_tps, "tok/s", "higher")
            note(f"  {args.batch} adapters over base-only, {label}", "", f"{mixed_tps / base_tps:.2f}")
            if q == "none":
                peft_tps = args.batch / peft_ms * 1000
                add(f"batch-{args.batch} tok/s, {label}, PEFT 8 adapters mixed vs ours {args.batch}", peft_tps,
                    mixed_tps, "tok/s", "higher")
            add(f"time to first token, {args.ctx}-token prompt, {label}", None, ttft_ms(runtime, args.ctx), "ms")
            mix = [None, None, None, None] + adapters[:4]
            rows_same, tokens_same, hf_same, fast_tokens = agreement(runtime, check_prompts, mix, args.new,
                                                                     hf_tokens)
            note(f"  fast path vs eager path, {label}, 4 base + 4 LoRA rows", f"rows identical {rows_same:.0%}",
                 f"tokens before divergence {tokens_same:.0%}; base rows = HF generate {hf_same:.0%}")
            note(f"  decode graphs captured, {label}", str(runtime.engine.runner.decoder.captures), "")
            adapters = mix = None  # the daemon keeps no unloaded adapter alive: neither may the bench
            pool_before = runtime.store.host_pool.stats()
            loads, reads = cold_loads_ms(runtime, ids[:20])
            p50, p95 = pct(loads, 0.5), pct(loads, 0.95)
            pool = {k: v - pool_before[k] for k, v in runtime.store.host_pool.stats().items()}
            note(f"  of which read + validate + pin (p50), {label}", f"{pct(reads, 0.5):.2f} ms",
                 f"host pool: {pool['reuses']} reused, {pool['allocations']} new, {pool['fallbacks']} past the cap")
            add(f"cold LoRA load r16 disk->slot p50, {label}", statistics.median(peft_load) if q == "none" else None,
                p50, "ms")
            add(f"cold LoRA load r16 disk->slot p95, {label}", None, p95, "ms")
        finally:
            runtime.close()
        put_back(model, norms)
        with step_context(StepContext("prefill")):  # a step without LoRA rows: the wrapped layers pass through
            if bnb_layers:
                put_back(model, dequantized(bnb_layers, base.dtype))
                exact, within = oracle_agreement(model, check_prompts[:4], fast_tokens[:4])
                note("  fast-path base rows judged by the dequantized int8 weights (teacher-forced)",
                     f"top token {exact:.0%}", f"within 1% of the logit range of the top {within:.0%}")
                put_back(model, bnb_layers)  # and by bitsandbytes' own matmul
            exact, within = oracle_agreement(model, check_prompts[:4], fast_tokens[:4])
        note(f"  fast-path base rows judged by {'bitsandbytes' if bnb_layers else 'transformers'} (teacher-forced)",
             f"top token {exact:.0%}", f"within 1% of the logit range of the top {within:.0%}")
        del runtime, base, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    if not args.no_record:
        record(rows, f"{args.shape}, {'own' if args.own_decoder else 'transformers'} decoder forward", machine)
    return 0


def record(rows, shape: str, machine: str) -> None:
    import transformers

    commit = git_commit()
    lines = [f"\n### serve_bench: {shape} on {machine}",
             f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}. Baseline = transformers + PEFT `generate()` in the same run.",
             "", "| measure | baseline | adapterd | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {b} | {o} | {r} |" for m, b, o, r in rows]
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
