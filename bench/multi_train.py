"""Data-parallel training measured (issue 21): ``adapterd train`` on one GPU against ``torchrun`` on two (NCCL),
the same global batch, the same data order, the same seed.

Each method (int8 LoRA, then int8 P-Tuning v2) trains twice through the real command line, on the random
Llama-2-7B-shaped base of bench/train_bench.py (its default ``--workdir``, written once per machine, with a
tokenizer) and synthetic Alpaca records that each fill the context (so every micro-batch is ``--batch x
--context`` tokens, no padding):

  (a) ``python -m adapterd.cli train --grad-accum N``            one GPU, N micro-batches a step
  (b) ``torchrun --standalone --nproc-per-node N -m adapterd.cli train``   N GPUs, one micro-batch each a step

Both run ``--warmup + --steps`` optimizer steps and write the same checkpoints (at the middle of the timed
steps and at the end). Measured: tokens/s of the timed steps, all ranks' tokens (global batch x context x
steps over the time between rank 0's ``train.log`` lines of the last warm-up step and the last step; those
lines carry milliseconds), beside status.json's own tokens/s (times its elapsed seconds, that must be every
rank's tokens: status.json and TrainStatus report the whole run); the peak memory of each GPU (NVML, sampled every
0.2 s: what the GPU holds, CUDA context included; on the CPU, each rank's peak RSS); the ratio (b)/(a)
against 1.8; the loss of every step, (b) against (a). Then (b) is resumed under torchrun from its middle
checkpoint (written by rank 0) and must repeat its own losses from there on (both methods by default).

Loss agreement: LoRA dropout is 0 (with dropout every rank draws the same masks, so rank 1's micro-batch would
not get the one-GPU run's second mask) and both runs sum the same per-micro-batch gradients (each divided by
the micro-batches in the step): one process adds them up in the backward, torchrun in one all-reduce, one fp32
addition either way. What remains is rounding: on the CPU (fp32, deterministic kernels) none, hence 1e-5; on
the GPU the bf16 attention backward accumulates with atomics (no fixed order), so the weights drift by last
bits from step 2 on: 2e-3 relative, half of bf16's relative step 2^-8, which that drift should stay far below
(the largest difference is reported, so the bound can be tightened once measured). On a random base the loss
sits near ln(32000) = 10.37: this checks that the runs train the same thing, not that they learn.

On the two-GPU machine (device tool, kind nvidia-h200-x2, one call, under its 10 minutes):
    source bench/device_setup.sh > /tmp/setup.log 2>&1; bash bench/gpu_multi.sh train    # carry .whl
then here: python3 bench/multi_train.py --append-from multi_train.json (rows into bench/RESULTS.md).
    python bench/multi_train.py --tiny     # CPU: the tiny model, gloo, the same script end to end
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from multi_run import launch, loss_check, step_times
from results_table import append_to_section, git_commit
from train_bench import build_base, machine_name

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Training on several GPUs: data parallel (bench/multi_train.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "method", "GPUs", "global batch x ctx", "steps timed",
           "tokens/s (all GPUs)", "status.json tok/s", "peak GiB per GPU", "x one GPU", "loss vs one GPU",
           "resume from rank 0", "target", "met")
METHODS = ("lora", "ptuning-v2")
SPEEDUP_TARGET = 1.8  # issue 21: two GPUs >= 1.8x the one-GPU tokens/s
LOSS_RTOL = {"cpu": 1e-5, "cuda": 2e-3}  # why: the module docstring
WORDS = ("the quick brown fox jumps over lazy dog language model predicts next token adapters are small base "
         "large prefix tuning keys values attention layer low rank adaptation frozen weight").split()


def ensure_base(path: Path, tiny: bool) -> Path:
    """train_bench.py's random base (with its tokenizer), written in a child process when missing: writing it
    opens a CUDA context, which would otherwise stay in this process and count in GPU 0's memory readings."""
    if not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()):
        writer = multiprocessing.get_context("spawn").Process(target=build_base, args=(path, tiny))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the base {path} failed (exit {writer.exitcode})")
    return path


def write_data(path: Path, base: Path, records: int, context: int) -> Path:
    """``records`` Alpaca records, each longer than ``context`` tokens (cut to it by the trainer), written all
    at once; checked through the trainer's own tokenizing so that every example is exactly ``context``."""
    import random

    from adapterd.common.fsutil import write_atomic
    from adapterd.trainer import data as data_mod
    from adapterd.trainer.model import load_tokenizer

    rng = random.Random(0)
    lines = [json.dumps({"instruction": "Continue the text.", "input": "",
                         "output": " ".join(rng.choice(WORDS) for _ in range(context))}) for _ in range(records)]
    write_atomic(path, "\n".join(lines) + "\n")
    examples = data_mod.tokenize_all(data_mod.load_records(path), load_tokenizer(str(base)), context,
                                     skip_malformed=False)
    short = [i for i, e in enumerate(examples) if len(e.input_ids) != context]
    if short:
        raise SystemExit(f"{path}: records {short[:5]} are shorter than {context} tokens")
    return path


def plan(args: argparse.Namespace) -> dict[str, int]:
    """Steps and checkpoints of every run: the middle checkpoint is where the resume starts."""
    total = args.warmup + args.steps
    return {"total": total, "save": args.warmup + args.steps // 2, "global": args.batch * args.gpus}


def train_argv(args: argparse.Namespace, method: str, base: Path, data: Path, run_dir: Path, world: int) -> list[str]:
    """``adapterd train`` for one run: ``world`` processes share each step's ``--gpus`` micro-batches."""
    steps = plan(args)
    argv = ["-m", "adapterd.cli", "train", "--no-progress", "--base", str(base), "--data", str(data),
            "--output", str(run_dir), "--method", method, "--quantization", args.quantization,
            "--batch-size", str(args.batch), "--grad-accum", str(args.gpus // world),
            "--context-length", str(args.context), "--max-steps", str(steps["total"]),
            "--save-steps", str(steps["save"]), "--keep-last", "0", "--eval-split", "0", "--log-every", "1",
            "--learning-rate", str(args.learning_rate), "--lora-dropout", "0",
            "--num-virtual-tokens", str(args.virtual_tokens)]
    if world == 1:
        return [sys.executable, *argv]
    torchrun = Path(sys.executable).parent / "torchrun"  # the launcher of this Python's torch
    if not torchrun.is_file():
        raise SystemExit(f"no torchrun beside {sys.executable}")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(world), *argv]


def read_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """What a finished run left: losses (metrics.jsonl), status.json, checkpoints, tokens/s of the timed steps."""
    steps = plan(args)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    status = json.loads((run_dir / "status.json").read_text())
    times = step_times(run_dir / "train.log")
    first, last = args.warmup, steps["total"]
    span = times[last] - times[first] if first in times and last in times else 0.0
    tokens = (last - first) * steps["global"] * args.context
    gaps = sorted(times[s] - times[s - 1] for s in range(first + 1, last + 1) if s in times and s - 1 in times)
    # status.json's tokens/s x its elapsed seconds = the tokens it counted (one update computes both): every
    # rank's, if it reports the whole run
    counted = (status.get("tokens_per_second") or 0.0) * (status.get("elapsed_seconds") or 0.0)
    return {"state": status["state"], "step": status["step"], "losses": losses,
            "status_counts_all_ranks": abs(counted - last * steps["global"] * args.context) < 0.5,
            "tokens_per_s": tokens / span if span > 0 else None,
            "median_step_s": gaps[len(gaps) // 2] if gaps else None,
            "status_tokens_per_s": status.get("tokens_per_second"),
            "status_gpus": len(status.get("gpus") or []),
            "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*"))}


def run_one(args: argparse.Namespace, method: str, base: Path, data: Path, world: int, env: dict) -> dict:
    """Train one run from scratch; its result (``error`` when it failed)."""
    import shutil

    run_dir = args.workdir / "runs" / f"{method}-{world}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a warm machine's earlier run
    result = {"method": method, "gpus": world, "batch": args.batch, "context": args.context,
              "global_batch": plan(args)["global"], "steps_timed": args.steps, "run_dir": str(run_dir)}
    started = time.monotonic()
    done = launch(train_argv(args, method, base, data, run_dir, world), env, world, args.run_timeout,
                  run_dir.with_suffix(".log"))
    result |= {"wall_s": round(time.monotonic() - started, 1), "peak_gib": done.peaks_gib}
    if done.error:
        return result | {"error": done.error}
    result |= read_run(run_dir, args)
    if result["state"] != "completed" or result["step"] != plan(args)["total"]:
        result["error"] = f"ended {result['state']} at step {result['step']}"
    return result


def check_resume(args: argparse.Namespace, method: str, base: Path, data: Path, run: dict, env: dict) -> dict:
    """Resume the multi-GPU run from its middle checkpoint (rank 0's) under torchrun; it must repeat its
    losses after that step and complete."""
    save = plan(args)["save"]
    run_dir = Path(run["run_dir"])
    argv = train_argv(args, method, base, data, run_dir, args.gpus) + ["--resume", f"checkpoint-{save}"]
    done = launch(argv, env, args.gpus, args.run_timeout, run_dir.with_name(run_dir.name + "-resume.log"))
    if done.error:
        return {"from": save, "error": done.error}
    again = read_run(run_dir, args)
    check = loss_check(run["losses"][save:], again["losses"][save:], args.rtol)
    return {"from": save, "state": again["state"], **check}


def measure(args: argparse.Namespace, base: Path, data: Path, save_json) -> list[dict]:
    """Every method: one GPU, then ``--gpus``, then the resume; ``save_json`` after each run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name, value in (("OMP_NUM_THREADS", "1"), ("NCCL_NVLS_ENABLE", "0"),  # multicast off: KINDS.md
                        ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        env.setdefault(name, value)  # OMP: torchrun's default for its ranks, so the one-GPU run gets it too
    results: list[dict] = []
    for method in args.methods:
        one = run_one(args, method, base, data, 1, env)
        results.append(one)
        save_json(results)
        print(summary(one), flush=True)
        many = run_one(args, method, base, data, args.gpus, env)
        if "error" not in one and "error" not in many:
            timed = one["tokens_per_s"] and many["tokens_per_s"]  # None where rank 0's log had no step times
            many["speedup"] = many["tokens_per_s"] / one["tokens_per_s"] if timed else None
            many["loss_check"] = loss_check(one["losses"], many["losses"], args.rtol)
        results.append(many)
        save_json(results)
        if "error" not in many and method in args.resume:
            many["resume"] = check_resume(args, method, base, data, many, env)
            save_json(results)
        print(summary(many), flush=True)
    return results


def summary(result: dict) -> str:
    """One line for the log."""
    head = f"{result['method']} on {result['gpus']}: "
    if "error" in result:
        return head + "FAILED: " + result["error"]
    tps, status_tps = result["tokens_per_s"], result["status_tokens_per_s"] or 0.0
    text = (head + (f"{tps:,.0f} tokens/s" if tps else "no timing") + f" (status.json {status_tps:,.0f} "
            f"reading {result['status_gpus']} GPU), "
            f"peak GiB per GPU {result['peak_gib']}, wall {result['wall_s']} s, "
            f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    if "loss_check" in result:
        text += f"; x{result['speedup'] or 0:.2f} one GPU, loss max rel diff {result['loss_check']['max_rel']:.1e}"
    return text + (f"; resume {result['resume']}" if "resume" in result else "")


def _resume_cell(result: dict) -> str:
    resume = result.get("resume")
    if resume is None:
        return ""
    if "error" in resume:
        return "failed: " + resume["error"][:60]
    return (f"from step {resume['from']}: {'same' if resume['ok'] else 'differs'} "
            f"(max rel {resume['max_rel']:.1e}), {resume['state']}")


def to_row(result: dict, machine: str, commit: str, date: str, judge: bool = True) -> dict[str, str]:
    """One RESULTS.md row; the multi-GPU row is judged (``judge=False``, the tiny run: no target)."""
    row = {c: "" for c in COLUMNS} | {"date (UTC)": date, "commit": commit, "machine": machine,
                                      "method": result["method"], "GPUs": str(result["gpus"]),
                                      "global batch x ctx": f"{result['global_batch']} x {result['context']}",
                                      "steps timed": str(result["steps_timed"])}
    if "error" in result:
        return row | {"met": "error: " + result["error"][:80]}
    tps, status_tps = result["tokens_per_s"], result["status_tokens_per_s"]
    row |= {"tokens/s (all GPUs)": f"{tps:,.0f}" if tps else "-",
            "status.json tok/s": (f"{status_tps:,.0f}" if status_tps else "-") +
                                 ("" if result["status_counts_all_ranks"] else " (not all ranks' tokens)"),
            "peak GiB per GPU": ", ".join(f"{g:.1f}" for g in result["peak_gib"]) or "-",
            "resume from rank 0": _resume_cell(result)}
    check = result.get("loss_check")
    if check is None:  # the one-GPU run: nothing to judge; a multi-GPU run without one: nothing to judge against
        return row | ({"met": "no: no one-GPU run to compare"} if judge and result["gpus"] > 1 else {})
    speedup = result.get("speedup")
    row |= {"x one GPU": f"{speedup:.2f}" if speedup else "-",
            "loss vs one GPU": f"max rel {check['max_rel']:.1e} (tol {check['rtol']:g}, step {check['worst_step']})"}
    if judge:
        resumed = "resume" not in result or result["resume"].get("ok", False)  # a resume that failed has no "ok"
        ok = (bool(speedup and speedup >= SPEEDUP_TARGET) and check["ok"] and resumed
              and result["status_counts_all_ranks"])
        row |= {"target": f">= {SPEEDUP_TARGET}x, losses within tol, status.json counts all",
                "met": "yes" if ok else "no"}
    return row


def append_rows(rows: list[dict[str, str]], results: Path) -> None:
    intro = ("Data parallel with `torchrun` (NCCL) against one GPU, the same global batch and data order "
             "(bench/multi_train.py): Llama-2-7B shape, random weights, int8 base, AdamW, LoRA dropout 0. "
             "tokens/s = all ranks' tokens over the timed steps (after warm-up, rank 0's train.log); peak = "
             "NVML memory in use per GPU (CUDA context included). Loss = the largest relative difference of a "
             "step's loss from the one-GPU run's.")
    for line in append_to_section(results, SECTION, intro, COLUMNS, rows):
        print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU run on the tiny model (gloo), batch 2 x 64")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--resume", default="lora,ptuning-v2",
                   help="methods whose multi-GPU run is resumed (comma-separated)")
    p.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--batch", type=int, default=4, help="examples per micro-batch (one per GPU per step)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--virtual-tokens", type=int, default=128)
    p.add_argument("--quantization", default="int8")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed ones (at least 1)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--run-timeout", type=float, default=170.0, help="seconds one training run may take")
    p.add_argument("--base-dir", type=Path, default=None, help="the random base (train_bench.py's --workdir, "
                   "reused: written once per machine)")
    p.add_argument("--workdir", type=Path, default=None, help="the data and the run directories")
    p.add_argument("--prepare-only", action="store_true", help="write the base and the data, then exit")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here (after every run)")
    p.add_argument("--append-from", type=Path, help="only append rows saved with --json-out, then exit")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.context, args.virtual_tokens, args.learning_rate = 2, 64, 16, 1e-2
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 6)
    args.methods = [m for m in args.methods.split(",") if m]
    args.resume = [m for m in args.resume.split(",") if m]
    unknown = sorted(set(args.methods + args.resume) - set(METHODS))
    if unknown or args.warmup < 1 or args.gpus < 2:
        p.error(f"unknown method {unknown[0]!r}" if unknown else "--warmup must be at least 1, --gpus at least 2")
    suffix = "tiny" if args.tiny else "7b"  # train_bench.py's base directory, shared with bench/gpu_train.sh
    args.base_dir = args.base_dir or Path(tempfile.gettempdir()) / f"adapterd-bench-{suffix}"
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / f"adapterd-multi-train-{suffix}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.append_from:
        saved = json.loads(args.append_from.read_text())
        append_rows([to_row(r, saved["machine"], saved["commit"], saved["date"], judge=not saved["tiny"])
                     for r in saved["results"]], args.results)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: unwind, so launch() ends the ranks
    import torch

    from adapterd.common.fsutil import write_atomic

    args.rtol = LOSS_RTOL["cuda" if torch.cuda.is_available() else "cpu"]
    t0 = time.monotonic()
    base = ensure_base(args.base_dir, args.tiny)
    args.workdir.mkdir(parents=True, exist_ok=True)
    records = plan(args)["global"] * plan(args)["total"]  # one epoch: no step crosses an epoch's end
    data = write_data(args.workdir / f"data-{records}x{args.context}.jsonl", base, records, args.context)
    print(f"base and {records} records ready in {time.monotonic() - t0:.0f} s: {base}", flush=True)
    if args.prepare_only:
        return 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.tiny else 0  # no CUDA context
    saved = {"machine": (f"{gpus} x " if gpus > 1 else "") + machine_name(args.tiny),
             "commit": git_commit("trainer", "bench/multi_train.py"),
             "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "tiny": args.tiny, "rtol": args.rtol}

    def save_json(results: list[dict]) -> None:
        if args.json_out:  # after every run, so that a call cut short keeps what it measured
            write_atomic(args.json_out, json.dumps({**saved, "results": results}, indent=1))  # whole if killed

    results = measure(args, base, data, save_json)
    rows = [to_row(r, saved["machine"], saved["commit"], saved["date"], judge=not args.tiny) for r in results]
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    if not args.no_append and not args.tiny:
        append_rows(rows, args.results)
    return 1 if any("error" in r or "error" in r.get("resume", {}) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
