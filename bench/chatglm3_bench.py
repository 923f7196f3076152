"""ChatGLM3-6B from THUDM's layout to served: conversion time and memory, then serving speed with the
converted P-Tuning v2 and LoRA adapters, appended to bench/RESULTS.md beside serve_bench's Llama rows.

1. Writes a ChatGLM3-6B-shaped checkpoint with random fp16 weights in THUDM's names and layout (sharded
   safetensors, one tensor in memory at a time) and a SentencePiece ``tokenizer.model`` written as protobuf.
2. Runs ``adapterd convert chatglm3`` in a fresh process that reports its wall time and its peak resident set
   (Linux VmHWM, reset just before the conversion; its imports done before), beside the largest tensor:
   the conversion should need about one tensor on top of the process.
3. Writes a finetune_demo P-Tuning v2 checkpoint (prefix-only ``.bin``, 128 virtual tokens) and a PEFT LoRA on
   ``query_key_value`` (r=8), converts both, and serves the base (int8 by default on a GPU) with them:
   batch-1 decode ms/token at ``--ctx`` tokens of context, batch-N tokens/s base only and with base, prefix
   and LoRA rows mixed, time to first token (serve_bench's measurements).

    python bench/chatglm3_bench.py                          # on the GPU machine: 6B shape, int8
    python bench/chatglm3_bench.py --shape tiny --quantizations none --no-record   # the CPU check (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from results_table import append_to_section, git_commit
from serve_bench import engine_step_ms, ttft_ms

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## ChatGLM3-6B converted and served (bench/chatglm3_bench.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "model", "quantization", "convert s", "largest tensor MB",
           "convert peak RSS growth MB", "batch-1 ms/token", "batch-N tok/s base", "batch-N tok/s base+prefix+LoRA",
           "TTFT ms")
SHAPES = {  # THUDM's config.json fields
    "chatglm3-6b": dict(num_layers=28, hidden_size=4096, num_attention_heads=32, kv_channels=128,
                        multi_query_group_num=2, ffn_hidden_size=13696, padded_vocab_size=65024, seq_length=8192),
    "tiny": dict(num_layers=2, hidden_size=256, num_attention_heads=8, kv_channels=32, multi_query_group_num=2,
                 ffn_hidden_size=688, padded_vocab_size=1024, seq_length=2048),
}
PRE_SEQ_LEN, LORA_RANK = 128, 8

CHILD = """
import gc, json, sys, time
import transformers, tokenizers  # imported before the peak is reset: the process, not the conversion
from transformers import GenerationConfig, GlmConfig, PreTrainedTokenizerFast
from adapterd.server.convert.chatglm3 import convert_chatglm3

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
except OSError:
    pass  # then the peak includes start-up: an overestimate
before = kib("VmRSS")
start = time.monotonic()
result = convert_chatglm3(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.monotonic() - start, "rss_before_kib": before, "peak_kib": kib("VmHWM"),
                  "bytes_written": result.bytes_written}))
"""


def write_tokenizer_model(path: Path) -> None:
    """A SentencePiece BPE model as ChatGLM3's (byte fallback, identity normalizer): specials, 256 bytes, then
    printable ASCII and a few merges (each merge's halves are pieces too)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    proto = pb.ModelProto()
    proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback = 2, True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", True
    proto.normalizer_spec.remove_extra_whitespaces = False
    pieces = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in range(256)]
    words = ["▁t", "he", "▁the", "in", "er", "an", "▁a", "on", "re", "▁s"]
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    for i, (piece, kind) in enumerate(pieces + [(w, 1) for w in words] + [(c, 1) for c in chars]):
        entry = proto.pieces.add()
        entry.piece, entry.type, entry.score = piece, kind, 0.0 if kind != 1 else -float(i)
    path.write_bytes(proto.SerializeToString())


def source_config(shape: dict[str, int]) -> dict:
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
              "add_qkv_bias": True, "multi_query_attention": True, "rmsnorm": True, "post_layer_norm": True,
              "apply_residual_connection_post_layernorm": False, "layernorm_epsilon": 1e-5, "original_rope": True,
              "torch_dtype": "float16", "eos_token_id": 2, "pad_token_id": 0, **shape}


def source_entries(shape: dict[str, int]) -> list:
    """The fp16 tensors of THUDM's layout for ``shape``, as planned safetensors entries."""
    from adapterd.server.convert.chatglm3_layout import base_tensors, parse_config
    from adapterd.server.safetensors_io import TensorEntry

    shapes = base_tensors(parse_config(source_config(shape)))
    return [TensorEntry(n, "F16", s, Path(), 0, 2 * torch.Size(s).numel()) for n, s in shapes.items()]


def write_source(src: Path, shape: dict[str, int]) -> None:
    """THUDM's layout with random fp16 weights, streamed one tensor at a time."""
    from adapterd.server.safetensors_io import ShardWriter, plan_shards, write_index

    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(source_config(shape), indent=2))
    write_tokenizer_model(src / "tokenizer.model")
    entries = source_entries(shape)
    plans = plan_shards(entries, 2 * 1024**3)
    gen = torch.Generator().manual_seed(0)
    for plan in plans:
        writer = ShardWriter(src / plan.filename, plan)
        for entry in plan.entries:
            ones = entry.name.endswith("layernorm.weight")
            tensor = torch.ones(entry.shape) if ones else torch.randn(entry.shape, generator=gen) * 0.02
            writer.write_tensor(entry, tensor.to(torch.float16))
            del tensor
        writer.close()
    write_index(src, plans)


def write_adapters(work: Path, shape: dict[str, int]) -> tuple[Path, Path]:
    """finetune_demo's two outputs: a prefix-only P-Tuning v2 .bin and a PEFT LoRA on query_key_value."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    width = shape["num_layers"] * 2 * shape["kv_channels"] * shape["multi_query_group_num"]
    pt = work / "ptuning-checkpoint"
    pt.mkdir(parents=True, exist_ok=True)
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.randn(PRE_SEQ_LEN, width, generator=gen)},
               pt / "pytorch_model.bin")
    lora = work / "lora-checkpoint"
    lora.mkdir(parents=True, exist_ok=True)
    rows = (shape["num_attention_heads"] + 2 * shape["multi_query_group_num"]) * shape["kv_channels"]
    tensors = {}
    for i in range(shape["num_layers"]):
        key = f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value"
        tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, shape["hidden_size"], generator=gen) * 0.01
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, LORA_RANK, generator=gen) * 0.01
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 32,
        "target_modules": ["query_key_value"], "lora_dropout": 0.1, "bias": "none"}))
    return pt, lora


def convert_in_child(src: Path, dst: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve(glm: Path, root: Path, quantization: str, args: argparse.Namespace) -> dict[str, float]:
    from adapterd.server.engine import EngineConfig
    from adapterd.server.model import load_base_model, pick_device
    from adapterd.server.runtime import Runtime

    base = load_base_model(glm, quantization, device=str(pick_device()))
    runtime = Runtime(base, root, EngineConfig(max_batch_size=max(64, args.batch), max_lora_rank=16,
                                               max_prefill_tokens=args.ctx * args.batch))
    runtime.engine.start()
    try:
        prefix, lora = runtime.store.get("ptuning"), runtime.store.get("lora")
        engine_step_ms(runtime, 3, args.ctx, 4, [None, prefix, lora])  # warm-up, not recorded
        mixed = [(None, prefix, lora)[i % 3] for i in range(args.batch)]
        return {"ms": engine_step_ms(runtime, 1, args.ctx, args.new, [None]),
                "base_tps": args.batch * 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new,
                                                               [None] * args.batch),
                "mixed_tps": args.batch * 1000 / engine_step_ms(runtime, args.batch, args.ctx, args.new, mixed),
                "ttft": ttft_ms(runtime, args.ctx)}
    finally:
        runtime.close()


def main() -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="chatglm3-6b" if gpu else "tiny")
    p.add_argument("--quantizations", default="int8" if gpu else "none", help="comma-separated: int8,nf4,none")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adapterd-chatglm3-bench")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--new", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    from adapterd.server.convert.chatglm3_adapter import convert_chatglm3_adapter

    shape = SHAPES[args.shape]
    work = args.work
    src, glm, root = work / "chatglm3-src", work / "chatglm3-glm", work / "adapters"
    if not (src / "config.json").is_file():
        write_source(src, shape)
    largest = max(e.nbytes for e in source_entries(shape))
    print(f"source written: {args.shape}, largest tensor {largest / 1e6:.0f} MB", flush=True)
    if glm.exists():
        import shutil

        shutil.rmtree(glm)
    conv = convert_in_child(src, glm)
    growth = (conv["peak_kib"] - conv["rss_before_kib"]) / 1024
    print(f"converted in {conv['seconds']:.1f} s, {conv['bytes_written'] / 1e9:.2f} GB; peak RSS growth "
          f"{growth:.0f} MB (largest tensor {largest / 1e6:.0f} MB)", flush=True)
    pt, lora = write_adapters(work, shape)
    for source, name in ((pt, "ptuning"), (lora, "lora")):
        done = convert_chatglm3_adapter(source, root / name, glm, overwrite=True)
        print(f"adapter {name}: {done.kind}, {done.detail}", flush=True)
    machine = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for q in args.quantizations.split(","):
        speed = serve(glm, root, q, args)
        print(f"{q}: batch-1 {speed['ms']:.2f} ms/token at ctx {args.ctx}; batch-{args.batch} base "
              f"{speed['base_tps']:.1f} tok/s, base+prefix+LoRA {speed['mixed_tps']:.1f} tok/s; "
              f"TTFT {speed['ttft']:.1f} ms", flush=True)
        rows.append(dict(zip(COLUMNS, (
            datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), git_commit(), machine,
            f"{args.shape} (random fp16, THUDM layout)", q, f"{conv['seconds']:.1f}", f"{largest / 1e6:.0f}",
            f"{growth:.0f}", f"{speed['ms']:.2f}", f"{speed['base_tps']:.1f}", f"{speed['mixed_tps']:.1f}",
            f"{speed['ttft']:.1f}"), strict=True)))
    if not args.no_record:
        intro = (f"ctx {args.ctx}, batch-N = {args.batch} rows ({PRE_SEQ_LEN}-token prefix and r={LORA_RANK} LoRA "
                 "rows a third each when mixed). Peak RSS growth: the conversion process's VmHWM minus its "
                 "resident set just before converting; compare it with the largest tensor.")
        append_to_section(RESULTS, SECTION, intro, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
