"""Serving speed: adapterd's engine against transformers + PEFT, measured in the same run.

On the GPU machine (``--shape llama2-7b``, the default there) it builds a Llama-2-7B-shaped model with random
bf16 weights (no download), saves it once, and measures for each quantization:

1. batch-1 decode time per token at 512 tokens of context (engine and HF ``generate``), and the roofline
   (weight bytes + live KV bytes over the measured device-copy bandwidth);
2. batch-32 decode throughput: base only; 32 rows on 32 distinct LoRA adapters (r=16 on q,k,v,o; on every linear
   with ``--lora-targets all``); PEFT's mixed batch (``adapter_names``, 8 adapters);
3. time to first token for a 512-token prompt;
4. cold adapter load, disk to device slot, r=16 (p50 and p95 over 20 adapters) against PEFT's load_adapter;
5. the fast path's tokens (bench/serve_checks.py): against the engine's eager path and HF ``generate``; batch
   invariance (requests alone against the same requests in a batch of ``--batch`` rows, the others on other
   adapters); teacher-forced, base rows judged by transformers and LoRA rows by PEFT (for int8 also by the
   dequantized weights).

``--decoders own,transformers`` measures all of it for each decoder forward on the same loaded base (the
engine's own, and transformers' as ``serve --no-own-decoder`` runs it), one table.

``--set kernels.int8_shrink.IN_MATMUL=False`` (repeatable) sets a server switch for the run, and the table's
header names it: a default's figures beside the same run with it flipped (the check prompts are seeded, so the
teacher-forced figures of two runs judge the same prompts).

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
import time
from pathlib import Path

import torch
from engine_run import engine_run, sync
from results_table import git_commit
from serve_checks import Checks, bnb_int8_layers, hf_norms, judge, measure_tokens, put_back, unwrap_lora
from step_profile import profile_graph

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
# --lora-targets: the attention's four (issue 18's figures), or every linear layer (QLoRA's and llama-recipes' habit)
TARGET_SETS = {"attention": LORA_TARGETS, "all": LORA_TARGETS + ("gate_proj", "up_proj", "down_proj")}


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
    del model, gen
    if torch.cuda.is_available():  # the caller's process keeps running: give the 13 GB back to the device
        torch.cuda.empty_cache()
    return path


def make_lora_dirs(root: Path, base_dir: Path, n: int, rank: int = 16,
                   targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """n PEFT-format LoRA adapters (rank ``rank`` on ``targets``, bf16 weights as PEFT would save them after
    training); adapters on other targets than the attention's four are named apart (``lora-q-k-v-o-gate-up-down000``
    for every linear)."""
    from safetensors.torch import save_file

    cfg = json.loads((base_dir / "config.json").read_text())
    hidden, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    # module -> (its parent, in, out)
    shapes = {"q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", hidden, kv),
              "v_proj": ("self_attn", hidden, kv), "o_proj": ("self_attn", hidden, hidden),
              "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter),
              "down_proj": ("mlp", inter, hidden)}
    prefix = "lora" if targets == LORA_TARGETS else "lora-" + "-".join(t.removesuffix("_proj") for t in targets)
    ids = []
    for i in range(n):
        d = root / f"{prefix}{i:03d}"
        ids.append(d.name)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for m in targets:
                parent, in_f, out_f = shapes[m]
                key = f"base_model.model.model.layers.{layer}.{parent}.{m}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": str(base_dir), "inference_mode": True}))
    return ids


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


def roofline_s(base, ctx: int, bandwidth: float | None) -> float | None:
    """Seconds a batch-1 step needs to read every weight and the live key/values once at the copy bandwidth.
    Taken on the plain model, before an engine wraps it: the LoRA tables it adds are module buffers (~1.1 GB
    at 33 slots x rank 16 on q, k, v, o of the 7B shape) that a base-only step does not read (runs before
    issue 18 counted them)."""
    if not bandwidth:
        return None
    kv_bytes = 2 * base.num_layers * base.num_kv_heads * base.head_dim * ctx * 2
    return (weight_bytes(base.model) + kv_bytes) / bandwidth


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

class Table:
    """The run's rows (measure, baseline, adapterd, ratio or note), printed as they come."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, measure: str, baseline: float | None, ours: float, unit: str, better: str = "lower") -> None:
        ratio = "" if not baseline else (f"{baseline / ours:.2f}x" if better == "lower" else f"{ours / baseline:.2f}x")
        self.rows.append((measure, f"{baseline:.2f} {unit}" if baseline else "-", f"{ours:.2f} {unit}", ratio))
        print(f"{measure:55s} baseline {self.rows[-1][1]:>14s}  adapterd {self.rows[-1][2]:>14s}  {ratio}",
              flush=True)

    def note(self, measure: str, ours: str, ratio: str) -> None:
        self.rows.append((measure, "", ours, ratio))
        print(f"{measure:55s} {ours:>40s}  {ratio}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b" if torch.cuda.is_available()
                        else "tiny")
    parser.add_argument("--quantizations", default="none,int8,nf4")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "adapterd-bench"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--batch", type=int, default=32, help="rows of the batched measurements (at least 8)")
    parser.add_argument("--lora-targets", choices=sorted(TARGET_SETS), default="attention",
                        help="the adapters' target modules: attention (q, k, v, o) or all (and gate, up, down)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--profile-dir", type=Path, help="also profile the batch-1 and batch-N decode graphs' "
                        "kernels (bench/step_profile.py): a table a graph, printed and written here")
    parser.add_argument("--decoders", default="own",
                        help="comma-separated decoder forwards, each measured on the same loaded base: own (the "
                             "engine's), transformers (`serve --no-own-decoder`)")
    parser.add_argument("--set", action="append", default=[], metavar="SWITCH=VALUE",
                        help="a server switch for the run, '<module under adapterd.server>.<attribute>=<Python "
                             "literal>' (as kernels.int8_shrink.IN_MATMUL=False), repeatable: a default's figures, "
                             "the teacher-forced ones included, beside the same run with it flipped")
    args = parser.parse_args()
    args.decoders = args.decoders.split(",")
    if args.batch < 8 or not set(args.decoders) <= {"own", "transformers"}:
        parser.error("--batch must be at least 8, --decoders a list of own and transformers")
    try:
        args.switches = [set_switch(setting) for setting in args.set]
    except ValueError as e:
        parser.error(f"--set: {e}")
    return args


def set_switch(setting: str) -> str:
    """Sets one server switch, ``"kernels.int8_shrink.IN_MATMUL=False"``, for this process (the engine reads each at
    its launches and captures); returns it as set. ValueError names what is wrong: the form, the module, an
    attribute the module lacks (a typo must not measure the default under another name), the value."""
    import ast
    import importlib

    name, sep, literal = setting.partition("=")
    module_name, _, attribute = name.strip().rpartition(".")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{setting!r} is not <module>.<attribute>=<value>")
    try:
        module = importlib.import_module(f"adapterd.server.{module_name}")
    except ImportError as e:
        raise ValueError(f"no module adapterd.server.{module_name}: {e}") from None
    if not hasattr(module, attribute):
        raise ValueError(f"adapterd.server.{module_name} has no {attribute}")
    try:
        value = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{literal.strip()!r} (for {name.strip()}) is not a Python literal") from None
    setattr(module, attribute, value)
    return f"{module_name}.{attribute}={value!r}"


def peft_baseline(model, adapter_root: Path, ids: list[str], args, device) -> tuple[object, float, list[float]]:
    """PEFT's mixed batch (8 adapters over ``args.batch`` rows): decode ms per step, and its load_adapter
    times; returns the base model unwrapped again."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_root / ids[0], adapter_name=ids[0])
    for a in ids[1:8]:
        peft_model.load_adapter(adapter_root / a, adapter_name=a)
    names = [ids[i % 8] for i in range(args.batch)]
    peft_ms = hf_decode_ms(peft_model, args.batch, args.ctx, args.new, device, adapter_names=names)
    loads = []
    for a in ids[8:12]:
        sync(device)
        t = time.perf_counter()
        peft_model.load_adapter(adapter_root / a, adapter_name=a)
        sync(device)
        loads.append((time.perf_counter() - t) * 1000)
    return peft_model.unload(), peft_ms, loads


def measure_speed(runtime, ids: list[str], args, label: str, hf_ms: float, peft_ms: float | None,
                  roofline: float | None, table: Table) -> None:
    ms = engine_step_ms(runtime, 1, args.ctx, args.new, [None])
    floor = roofline * 1000 if roofline else None
    table.add(f"batch-1 decode ms/token, {label}, ctx {args.ctx}", hf_ms, ms, "ms")
    device_ms = replay_ms(runtime, 1)
    if device_ms:
        table.note(f"  of which device (graph replayed alone), {label}", f"{device_ms:.2f} ms",
                   f"host {ms - device_ms:.2f} ms")
    if floor:
        table.note(f"  roofline {label} (weights + KV over copy bandwidth)", f"{floor:.2f} ms",
                   f"{floor / ms:.0%} of roofline")
    adapters = [runtime.store.get(a) for a in ids[: args.batch]]
    table.add(f"batch-1 decode ms/token, {label}, one LoRA r16", None,
              engine_step_ms(runtime, 1, args.ctx, args.new, adapters[:1]), "ms")
    base_tps = 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new, [None] * args.batch) * args.batch
    mixed_tps = 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new, adapters) * args.batch
    table.add(f"batch-{args.batch} tok/s, {label}, base only", None, base_tps, "tok/s", "higher")
    device_ms = replay_ms(runtime, args.batch)
    if device_ms:
        table.note(f"  batch-{args.batch} step: device (graph replayed alone), {label}", f"{device_ms:.2f} ms",
                   f"engine step {args.batch / base_tps * 1000:.2f} ms")
    on = "" if args.lora_targets == "attention" else f" on {args.lora_targets} linears"
    table.add(f"batch-{args.batch} tok/s, {label}, {args.batch} distinct LoRA{on}", None, mixed_tps, "tok/s",
              "higher")
    # three places: issue 18's line is >= 0.95, and two would print 0.9489 as 0.95
    table.note(f"  {args.batch} adapters{on} over base-only, {label}", "", f"{mixed_tps / base_tps:.3f}")
    if peft_ms:
        table.add(f"batch-{args.batch} tok/s, {label}, PEFT 8 adapters mixed vs ours {args.batch}",
                  args.batch / peft_ms * 1000, mixed_tps, "tok/s", "higher")
    table.add(f"time to first token, {args.ctx}-token prompt, {label}", None, ttft_ms(runtime, args.ctx), "ms")


def print_tuned(label: str) -> None:
    """The autotuners' picks the decode steps run with (they differ between fresh machines: bench/NOTES.md)."""
    if not torch.cuda.is_available():
        return
    from adapterd.server.engine import step_tuning
    from adapterd.server.kernels import dense_gemv, int8_linear, int8_matmul

    for name, module in (("int8", int8_matmul), ("bf16 GEMV", dense_gemv)):
        for key, config in module.tuned_configs().items():
            print(f"tuned, {label}: {name} ({key}): {config}", flush=True)
    for (n, k, *_), (ours, theirs, kernel) in dense_gemv.judgements().items():
        print(f"tuned, {label}: {n}x{k} at one row, GEMV {ours:.1f} us, F.linear {theirs:.1f} us (warm-up judge) -> "
              f"{'GEMV' if kernel else 'F.linear'}", flush=True)
    for (_, _, n, k, *_), times in int8_linear.one_row_judgements().items():
        tiles = ", ".join(f"{tile} {us:.1f}" for tile, us in sorted(times.items(), key=lambda item: item[1]))
        print(f"tuned, {label}: int8 {n}x{k} at one row, us a call after a norm (warm-up judge, fastest first): "
              f"{tiles}", flush=True)
    for (_, _, n, k, *_), times in step_tuning.step_tunings().items():
        tiles = ", ".join(f"{tile} {ms:.3f}" for tile, ms in sorted(times.items(), key=lambda item: item[1]))
        print(f"tuned, {label}: int8 {n}x{k} at one row, ms a decode step (tuned in the step, fastest first): "
              f"{tiles}", flush=True)


def profile_steps(runtime, args, label: str) -> None:
    for batch, lora, what in ((1, False, "batch 1"), (args.batch, False, f"batch {args.batch} base"),
                              (args.batch, True, f"batch {args.batch} on {args.batch} LoRA")):
        if profile_graph(runtime, batch, lora, f"{label}, {what}", args.profile_dir) is None:
            print(f"profile: no captured decode graph for {label}, {what}", flush=True)


def measure_loads(runtime, ids: list[str], label: str, peft_load: list[float], table: Table) -> None:
    pool_before = runtime.store.host_pool.stats()
    loads, reads = cold_loads_ms(runtime, ids[:20])
    pool = {k: v - pool_before[k] for k, v in runtime.store.host_pool.stats().items()}
    table.note(f"  of which read + validate + pin (p50), {label}", f"{pct(reads, 0.5):.2f} ms",
               f"host pool: {pool['reuses']} reused, {pool['allocations']} new, {pool['fallbacks']} past the cap")
    table.add(f"cold LoRA load r16 disk->slot p50, {label}", statistics.median(peft_load) if peft_load else None,
              pct(loads, 0.5), "ms")
    table.add(f"cold LoRA load r16 disk->slot p95, {label}", None, pct(loads, 0.95), "ms")


def main() -> int:
    args = parse_args()
    if args.switches:
        print("switches set for the run:", ", ".join(args.switches), flush=True)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    device = pick_device()
    work = Path(args.work)
    base_dir = build_model_dir(work / f"model-{args.shape}", args.shape, str(device))
    adapter_root = work / "adapters"
    ids = make_lora_dirs(adapter_root, base_dir, max(args.batch, 20), targets=TARGET_SETS[args.lora_targets])
    bandwidth = copy_bandwidth(device)
    table = Table()
    for q in args.quantizations.split(","):
        base = load_base_model(base_dir, q, device=str(device))
        qlabel = {"none": str(base.dtype).removeprefix("torch."), "int8": "int8", "nf4": "nf4"}[q]
        hf_ms = hf_decode_ms(base.model, 1, args.ctx, args.new, device)
        checks = Checks(base.model, args.ctx, args.new)
        peft_ms, peft_load = None, []
        if q == "none":
            base.model, peft_ms, peft_load = peft_baseline(base.model, adapter_root, ids, args, device)
        model = base.model
        bnb_layers = bnb_int8_layers(model) if q == "int8" else {}
        originals = {**bnb_layers, **hf_norms(model)}  # what the engine's kernel swaps replace
        roofline = roofline_s(base, args.ctx, bandwidth)
        for decoder in args.decoders:
            label = f"{qlabel}, {decoder} forward"
            runtime = Runtime(base, adapter_root, EngineConfig(
                max_batch_size=max(64, args.batch), lora_slots=args.batch, max_lora_rank=16,
                max_prefill_tokens=args.ctx * args.batch, own_decoder=decoder == "own"))
            runtime.engine.start()
            try:
                engine_step_ms(runtime, 2, args.ctx, 8, [None, runtime.store.get(ids[0])])  # warm-up, not recorded
                measure_speed(runtime, ids, args, label, hf_ms, peft_ms, roofline, table)
                print_tuned(label)
                if args.profile_dir:
                    profile_steps(runtime, args, label)
                fast = measure_tokens(runtime, ids, args, label, checks, table)
                measure_loads(runtime, ids, label, peft_load, table)
            finally:
                runtime.close()
            del runtime
            unwrap_lora(model)  # the plain base again: for PEFT, and for the next decoder's runtime
            put_back(model, originals)
            judge(model, base.dtype, bnb_layers, checks, fast, [adapter_root / a for a in ids[:4]], label, table)
        del base, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    if not args.no_record:
        record(table.rows, f"{args.shape}, {' and '.join(args.decoders)} decoder forward", machine, args.switches)
    return 0


def record(rows, shape: str, machine: str, switches: list[str]) -> None:
    import transformers

    commit = git_commit()
    lines = [f"\n### serve_bench: {shape} on {machine}",
             f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}. Baseline = transformers + PEFT `generate()` in the same run."
             + (f" Switches set for the run: {', '.join(switches)}." if switches else ""),
             "", "| measure | baseline | adapterd | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {b} | {o} | {r} |" for m, b, o, r in rows]
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
