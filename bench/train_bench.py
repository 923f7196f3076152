"""Training benchmark: peak GPU memory and tokens/s of adapterd's trainer against the usual PEFT recipe.

Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), random bf16 weights made
on the GPU and saved once (sharded safetensors, 13.5 GB, in ``--workdir``), batch 4 x 1024 tokens, AdamW.
Each scenario runs in its own subprocess (a clean CUDA context, so each peak is its own), loads the base the
way its recipe does, runs ``--warmup`` steps, then times ``--steps`` steps (median step time):

  usual-lora-int8     int8 base (threshold 6) + prepare_model_for_kbit_training + LoRA r8 q,v (its reentrant
                      gradient checkpointing): llama-recipes' 8-bit PEFT recipe
  usual-ptuning-int8  int8 base + PEFT prefix tuning, 128 virtual tokens, PEFT's own forward, no checkpointing
                      (PEFT refuses prefix tuning with checkpointing)
  lora-int8           adapterd's trainer: int8 base, dequant compute, non-reentrant checkpointing, LoRA r8 q,v
  lora-int8-bnb       the same with bitsandbytes' own int8 matmul (separates the two changes)
  ptuning-int8        adapterd's trainer: int8 base, prefix tuning 128 tokens through its frozen prefix cache,
                      with checkpointing
  lora-bf16           adapterd's trainer on a bf16 base (the floor int8 is measured against)
  usual-lora-bf16     bf16 base + LoRA r8 q,v + the model's own gradient checkpointing, PEFT's forward
  *-fused             the scenario with ``--fused-loss auto`` (liger-kernel's fused linear cross-entropy where it
                      imports, else the chunked torch one: no 32,000-wide logits); *-fused-torch forces the torch one
  *-kernels           (last, after any -fused suffix) the scenario with ``--kernels auto``: liger-kernel's Triton
                      RMSNorm, RoPE and SwiGLU in the base where it imports on CUDA and passes the probe, else
                      none; the row names which ran, as it names the fused loss (issue 20)

``--profile`` adds two more steps under torch.profiler and writes each scenario's top operators by device and
by CPU time to ``--profile-dir`` (``profile-SCENARIO.txt``; stderr without it).

Tokens/s counts every token of the batch (no padding: random ids, full length). Peak memory is
``torch.cuda.max_memory_reserved`` (what the GPU must hold; allocated is reported too), reset after loading
so that it covers the training steps, plus the weights that stay. Targets (issue 7): int8 LoRA <= 12 GiB and
>= 9,000 tokens/s; P-Tuning v2 on int8 <= 16 GiB (issue 20: and >= 9,000 tokens/s).

    python bench/train_bench.py                       # on the GPU host; appends rows to bench/RESULTS.md
    python bench/train_bench.py --tiny                # CPU smoke run of every scenario on the tiny model
    python bench/train_bench.py --json-out r.json --no-append   then  --append-from r.json (here)
    bash bench/gpu_train.sh PART                      # the next GPU session's device calls (issue 20)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Training: int8 LoRA and P-Tuning v2 (bench/train_bench.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "scenario", "batch x ctx", "peak reserved GiB",
           "peak allocated GiB", "tokens/s", "median step s", "target", "met")
SCENARIOS = ("usual-lora-int8", "usual-ptuning-int8", "lora-int8", "lora-int8-bnb", "ptuning-int8", "lora-bf16",
             "usual-lora-bf16", "lora-int8-fused", "lora-int8-fused-torch", "ptuning-int8-fused", "lora-bf16-fused",
             "lora-int8-kernels", "lora-int8-fused-kernels", "ptuning-int8-fused-kernels",
             "lora-int8-fused-torch-kernels")
FUSED_SUFFIXES = {"-fused": "auto", "-fused-torch": "torch"}  # scenario suffix -> TrainConfig.fused_loss
# Scenario suffix -> TrainConfig.kernels. auto, as -fused: on the GPU liger's kernels where they import and pass
# the probe (the row says "kernels liger"), on the CPU smoke run none ("kernels off"), never a lost scenario.
KERNELS_SUFFIX = ("-kernels", "auto")
TARGETS = {"lora-int8": (12.0, 9000.0), "ptuning-int8": (16.0, 9000.0)}
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def build_base(out: Path, tiny: bool) -> Path:
    """Random-weight model directory with a tokenizer (``adapterd train`` reads it: bench/multi_train.py), made
    on the GPU when there is one. Reused when already there. Written into a temporary directory renamed at
    the end, so that a run killed while writing the 13.5 GB never leaves a base that looks whole."""
    from adapterd.common.fsutil import AtomicDir
    from adapterd.common.tiny_model import build_tiny_model, build_tokenizer

    if not (out / "config.json").is_file():
        with AtomicDir(out, replace=True) as tmp:
            if tiny:
                build_tiny_model(tmp)
            else:
                _write_random_7b(tmp)
                build_tokenizer(1024).save_pretrained(tmp)  # 1,024 byte-level BPE ids, within the 32,000 rows
    elif not (out / "tokenizer.json").is_file():  # a base written before the tokenizer was: add it
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            build_tokenizer(1024).save_pretrained(tmp)
            for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == "tokenizer.json"):  # marker last
                os.replace(path, out / path.name)
    return out


def _write_random_7b(out: Path) -> None:
    """The Llama-2-7B shape with random bf16 weights, initialised on the GPU, saved in 2 GB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA2_7B, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def _usual_model(base: str, method: str, device, quantized: bool = True):
    """The reference recipe, as people run it: default int8 threshold, prepare_model_for_kbit_training for
    LoRA, PEFT's forward for prefix tuning; on a bf16 base, the model's own gradient checkpointing."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
    if method == "lora" and quantized:
        model = prepare_model_for_kbit_training(model)
    elif method == "lora":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                            task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(num_virtual_tokens=128, prefix_projection=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)

    def loss_fn(batch):
        return peft_model(**batch).loss

    return peft_model, loss_fn, "plain", "off"


def split_scenario(scenario: str) -> tuple[str, str, str]:
    """(the scenario without its suffixes, TrainConfig.fused_loss, TrainConfig.kernels): ``lora-int8-fused`` ->
    (``lora-int8``, ``auto``, ``off``); ``lora-int8-fused-kernels`` -> (``lora-int8``, ``auto``, ``auto``)."""
    kernels = "off"
    if scenario.endswith(KERNELS_SUFFIX[0]):
        scenario, kernels = scenario[:-len(KERNELS_SUFFIX[0])], KERNELS_SUFFIX[1]
    for suffix, mode in sorted(FUSED_SUFFIXES.items(), key=lambda item: -len(item[0])):
        if scenario.endswith(suffix):
            return scenario[:-len(suffix)], mode, kernels
    return scenario, "off", kernels


def _our_model(base: str, scenario: str, device, virtual_tokens: int):
    """adapterd's trainer path: the same functions ``adapterd train`` runs."""
    from adapterd.trainer import model as model_mod
    from adapterd.trainer.config import TrainConfig

    plain, fused, kernels = split_scenario(scenario)
    if fused == "auto" and device.type != "cuda":
        fused = "torch"  # auto is off on the CPU; the smoke run measures the torch head in liger's place
    method = "ptuning-v2" if plain.startswith("ptuning") else "lora"
    cfg = TrainConfig(base=base, data="-", output="-", method=method,
                      quantization="none" if plain.endswith("bf16") else "int8",
                      int8_compute="bnb" if plain.endswith("bnb") else "dequant",
                      gradient_checkpointing="on", num_virtual_tokens=virtual_tokens, fused_loss=fused,
                      kernels=kernels)
    model = model_mod.load_base(cfg, device)
    if cfg.quantization == "int8" and cfg.int8_compute == "dequant":
        model_mod.use_dequant_int8(model)
    peft_model = model_mod.make_peft_model(model, cfg)
    model_mod.enable_checkpointing(peft_model, cfg)
    if method == "ptuning-v2" and not model_mod.check_prefix_reaches_layers(peft_model, cfg, device):
        raise RuntimeError("the prefix cache is dropped under gradient checkpointing on this transformers")
    kernels_name = model_mod.training_kernels(peft_model, cfg, device)
    head, head_name = model_mod.loss_head(peft_model, cfg, device)

    def loss_fn(batch):
        return model_mod.forward_loss(peft_model, batch, cfg, head)[0]

    return peft_model, loss_fn, head_name, kernels_name


def write_profile(step, cuda: bool, scenario: str, out_dir: Path | None) -> None:
    """Two more steps under torch.profiler; the top operators by device time (on a GPU) and by CPU time, to
    ``out_dir/profile-SCENARIO.txt`` or, without a directory, to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
        step()
    averages = prof.key_averages()
    tables = [f"## {scenario}: top operators by {key} (two steps)\n"
              + averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
              for key in (["cuda_time_total"] if cuda else []) + ["cpu_time_total"]]
    text = "\n".join(tables)
    if out_dir is None:
        print(text, file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-{scenario}.txt").write_text(text, encoding="utf-8")


def run_scenario(scenario: str, base: str, batch: int, context: int, warmup: int, steps: int,
                 virtual_tokens: int, profile: bool = False, profile_dir: Path | None = None) -> dict:
    """One scenario in this process: load, train ``warmup + steps`` steps, measure."""
    import torch

    from adapterd.server.model import pick_device

    device = pick_device()
    torch.manual_seed(0)
    t0 = time.monotonic()
    if scenario.startswith("usual-"):
        method = "lora" if "lora" in scenario else "ptuning"
        peft_model, loss_fn, loss_name, kernels_name = _usual_model(base, method, device,
                                                                    quantized=not scenario.endswith("bf16"))
    else:
        peft_model, loss_fn, loss_name, kernels_name = _our_model(base, scenario, device, virtual_tokens)
    load_s = time.monotonic() - t0
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = peft_model.get_base_model().config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def step() -> None:
        loss = loss_fn(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if cuda:
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if profile:  # where the time goes
        write_profile(step, cuda, scenario, profile_dir)
    step_s = statistics.median(times)
    if cuda:
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    else:
        import resource

        reserved = allocated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"scenario": scenario, "batch": batch, "context": context, "load_s": round(load_s, 1),
            "peak_reserved_gib": reserved / 2**30, "peak_allocated_gib": allocated / 2**30,
            "tokens_per_s": batch * context / step_s, "median_step_s": step_s,
            "first_loss": losses[0], "last_loss": losses[-1],
            "trainable": sum(p.numel() for p in params), "device": str(device), "loss": loss_name,
            "kernels": kernels_name}


def machine_name(tiny: bool) -> str:
    try:
        import torch

        if torch.cuda.is_available() and not tiny:
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.machine()})"



def to_row(result: dict, machine: str, commit: str, date: str, judge: bool = True) -> dict[str, str]:
    """One RESULTS.md row; ``judge=False`` (the tiny smoke run) leaves the target columns empty."""
    if "error" in result:
        return {c: "" for c in COLUMNS} | {"date (UTC)": date, "commit": commit, "machine": machine,
                                          "scenario": result["scenario"], "met": "error: " + result["error"][:80]}
    mem_target, speed_target = TARGETS.get(split_scenario(result["scenario"])[0], (None, None))
    target, met = "", ""
    if mem_target is not None and judge:
        target = f"<= {mem_target:g} GiB" + (f", >= {speed_target:,.0f} tok/s" if speed_target else "")
        ok = result["peak_reserved_gib"] <= mem_target and (not speed_target or
                                                             result["tokens_per_s"] >= speed_target)
        met = "yes" if ok else "no"
    ran = [] if result.get("loss", "plain") == "plain" else [result["loss"]]  # which fused loss ran: liger or torch
    if split_scenario(result["scenario"])[2] != "off":  # which kernels ran: liger, or off where they could not
        ran.append(f"kernels {result.get('kernels', 'off')}")
    scenario = result["scenario"] + (f" ({', '.join(ran)})" if ran else "")
    return {"date (UTC)": date, "commit": commit, "machine": machine, "scenario": scenario,
            "batch x ctx": f"{result['batch']} x {result['context']}",
            "peak reserved GiB": f"{result['peak_reserved_gib']:.1f}",
            "peak allocated GiB": f"{result['peak_allocated_gib']:.1f}",
            "tokens/s": f"{result['tokens_per_s']:,.0f}", "median step s": f"{result['median_step_s']:.3f}",
            "target": target, "met": met}


def append_rows(rows: list[dict[str, str]], results: Path) -> None:
    """Add rows under this benchmark's section of RESULTS.md, creating the section if needed."""
    intro = ("Llama-2-7B shape, random weights, batch 4 x 1024, AdamW; median step after warm-up. 'usual' is "
            "the reference PEFT recipe measured in the same run. The tutorial's figures: 7B int8 LoRA fits a "
            "16 GB GPU; ChatGLM3-6B P-Tuning v2 used 14.8 GB. Peak = torch.cuda.max_memory_reserved "
            "(on the CPU smoke run: the process's peak RSS).")
    added = append_to_section(results, SECTION, intro, COLUMNS, rows)
    print(f"appended to {results}:", *added, sep="\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model (batch 2 x 64)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: "
                   + ", ".join(SCENARIOS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--virtual-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=None, help="where the random base is written (reused)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--append-from", type=Path, help="only append rows saved with --json-out, then exit")
    p.add_argument("--profile", action="store_true", help="each scenario's top operators (torch.profiler), to "
                   "stderr or --profile-dir")
    p.add_argument("--profile-dir", type=Path, help="write profile-SCENARIO.txt here (implies --profile)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # one scenario, in its own process; prints one JSON line
        trainer_log = logging.getLogger("adapterd.trainer")  # which kernels and loss ran, and why (stderr)
        trainer_log.addHandler(logging.StreamHandler(sys.stderr))
        trainer_log.setLevel(logging.INFO)
        result = run_scenario(args.child, args.base, args.batch, args.context, args.warmup, args.steps,
                              args.virtual_tokens, args.profile or args.profile_dir is not None, args.profile_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.append_from:
        saved = json.loads(args.append_from.read_text())
        append_rows([to_row(r, saved["machine"], saved["commit"], saved["date"], judge=not saved.get("tiny"))
                     for r in saved["results"]], args.results)
        return 0
    if args.tiny:
        args.batch, args.context, args.virtual_tokens = 2, 64, 16
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 3)
    workdir = args.workdir or Path(tempfile.gettempdir()) / ("adapterd-bench-tiny" if args.tiny else
                                                               "adapterd-bench-7b")
    t0 = time.monotonic()
    base = build_base(workdir, args.tiny)
    print(f"base ready in {time.monotonic() - t0:.0f} s: {base}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    saved = {"machine": machine_name(args.tiny), "commit": git_commit("trainer", "bench/train_bench.py"),
             "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "tiny": args.tiny}
    results: list[dict] = []
    for scenario in [s for s in args.scenarios.split(",") if s]:
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r}")
        cmd = [sys.executable, __file__, "--child", scenario, "--base", str(base), "--batch", str(args.batch),
               "--context", str(args.context), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--virtual-tokens", str(args.virtual_tokens)] + (["--profile"] if args.profile else []) + \
              (["--profile-dir", str(args.profile_dir.resolve())] if args.profile_dir else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            result = {"scenario": scenario, "error": tail[0]}
            print(f"{scenario}: FAILED\n{proc.stderr[-3000:]}", flush=True)
        else:
            result = json.loads(line[len("RESULT "):])
            if args.profile and args.profile_dir is None:
                print(proc.stderr[-12000:], flush=True)
            for said in [x for x in proc.stderr.splitlines() if x.startswith("kernels: ")]:
                print(f"{scenario}: {said}", flush=True)  # liger's kernels kept (probe figures), or why not
            print(f"{scenario}: peak {result['peak_reserved_gib']:.2f} GiB reserved "
                  f"({result['peak_allocated_gib']:.2f} allocated), {result['tokens_per_s']:,.0f} tokens/s, "
                  f"step {result['median_step_s']:.3f} s, load {result['load_s']} s, "
                  f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} ({result['loss']}, kernels "
                  f"{result.get('kernels', 'off')})", flush=True)
        results.append(result)
        if args.json_out:  # after every scenario, so that a run cut short keeps what it measured
            args.json_out.write_text(json.dumps({**saved, "results": results}, indent=1))
    rows = [to_row(r, saved["machine"], saved["commit"], saved["date"], judge=not args.tiny) for r in results]
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    if not args.no_append and not args.tiny:
        append_rows(rows, args.results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
