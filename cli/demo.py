"""``adapterd demo``: the whole product on the embedded default. On the 2-core CPU machine with nothing cached:
25 s idle, 40 s while other jobs ran; 11 s again on the same ``--dir``, which reuses the model and the adapters
(bench/RESULTS.md).

1. builds the tiny model (random weights, offline tokenizer) in ``DIR/tiny-model``;
2. trains two adapters on the tutorial's examples with ``adapterd train`` (LoRA and P-Tuning v2, on the
   int8 base), side by side, exporting each into the adapter root ``DIR/adapters``, while ``adapterd serve``
   starts as its own process on that root (it loads an adapter on its first use);
3. waits for health SERVING;
4. asks "你是谁？" with each adapter and with none, in one mixed batch, and prints the answers;
5. stops the daemon with SIGTERM.

Every step is its own process with one torch thread (``_env``); most of the time left is each process
importing torch, transformers and PEFT."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HELP = "Build the tiny model, train a LoRA and a P-Tuning v2 adapter, serve them and query each."

DATA = Path(importlib.util.find_spec("adapterd.trainer").origin).parent / "examples" / "gitclone.json"
QUESTION = "你是谁？"
# Settings that make the random tiny model learn three answers in seconds on a CPU; a real run uses the
# recipe defaults (adapterd train --help).
TRAINING = {
    "gitclone-lora": ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--learning-rate", "5e-3",
                      "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                      "--lora-dropout", "0", "--max-steps", "80"],
    "gitclone-ptuning": ["--method", "ptuning-v2", "--num-virtual-tokens", "16", "--learning-rate", "5e-2",
                         "--max-steps", "300"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="demo-out", help="working directory (created; reused if present)")
    parser.add_argument("--quantization", default="int8", choices=["int8", "nf4", "none"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterd.cli", *args]


def _env() -> dict[str, str]:
    """The environment of every step's process: one torch thread unless the caller chose otherwise. The tiny
    model's matrices are too small for threads to pay: on the busy 2-core machine, training 300 P-Tuning v2 steps
    (model load included) took 11 s on one thread and 58 s on two (bench/RESULTS.md)."""
    return {"OMP_NUM_THREADS": "1", **os.environ}


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


@dataclass
class _Training:
    name: str
    proc: subprocess.Popen
    log: Path  # the command's own output (train.log in its run directory has the training log)
    started: float


def _start_training(base: Path, adapters: Path, runs: Path, quantization: str) -> list[_Training]:
    """Start ``adapterd train`` for each adapter not trained yet, side by side (one thread each)."""
    runs.mkdir(parents=True, exist_ok=True)
    started = []
    for name, options in TRAINING.items():
        if (adapters / name / "adapter_config.json").is_file():
            print(f"{name}: already trained ({adapters / name})")
            continue
        run_dir = runs / name
        cmd = _cli("train", "--base", str(base), "--data", str(DATA), "--output", str(run_dir),
                   "--quantization", quantization, "--batch-size", "3", "--eval-split", "0", "--save-steps",
                   "1000", "--no-progress", "--export-adapter", str(adapters / name), *options)
        if (run_dir / "train_config.json").is_file():
            cmd.append("--resume")
        log = runs / f"{name}.out"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
        print(f"{name}: training ({' '.join(options)}), output in {log}", flush=True)
        started.append(_Training(name, proc, log, time.monotonic()))
    return started


def _finish_training(trainings: list[_Training], adapters: Path) -> None:
    for job in trainings:
        code = job.proc.wait()
        if code != 0:
            sys.stdout.write(job.log.read_text(encoding="utf-8", errors="replace")[-3000:])
            raise SystemExit(f"adapterd demo: training {job.name} failed (exit {code}); its output: {job.log}")
        print(f"{job.name}: trained in {time.monotonic() - job.started:.1f} s -> {adapters / job.name}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _serve(base: Path, adapters: Path, quantization: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(_cli("serve", "--base", str(base), "--adapters", str(adapters), "--quantization",
                                 quantization, "--port", "0", "--log-level", "WARNING"),
                            stdout=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline()
    match = re.search(r"listening on \S+:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the daemon did not start: {line!r}")
    return proc, f"127.0.0.1:{match[1]}"


def run(args: argparse.Namespace) -> int:
    from ..clients import AdapterdClient
    from ..trainer.data import format_prompt

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.dir).resolve()
    base, adapters, runs = work / "tiny-model", work / "adapters", work / "runs"
    adapters.mkdir(parents=True, exist_ok=True)

    _step(f"1. tiny model in {base}")
    if not (base / "config.json").is_file():
        subprocess.run(_cli("tiny-model", str(base)), check=True, stdout=subprocess.DEVNULL, env=_env())
    print("built" if (base / "config.json").is_file() else "missing")

    _step(f"2. training two adapters on {DATA.name} ({args.quantization} base) while the daemon starts")
    trainings = _start_training(base, adapters, runs, args.quantization)
    try:
        proc, target = _serve(base, adapters, args.quantization)
    except BaseException:
        _stop([job.proc for job in trainings])
        raise
    try:
        _finish_training(trainings, adapters)
        _step("3. serving")
        with AdapterdClient(target, timeout=120) as client:
            client.wait_ready(120)
            info = client.model_info()
            print(f"adapterd {info.version} on {target}: {info.model_type}, {info.quantization}, {info.device}")

            _step(f"4. {QUESTION} with each adapter and with none (one mixed batch)")
            prompt = format_prompt(QUESTION)  # the Alpaca template the adapters were trained with
            jobs = ["gitclone-lora", "gitclone-ptuning", ""]
            with ThreadPoolExecutor(len(jobs)) as pool:
                replies = list(pool.map(lambda a: client.generate(prompt, a, max_new_tokens=40), jobs))
            for adapter_id, reply in zip(jobs, replies, strict=True):
                print(f"[{adapter_id or 'base model'}] {reply.text!r} ({reply.generated_token_count} tokens)")
            from ..v1 import adapterd_pb2 as pb

            for info in client.list_adapters():
                print(f"  adapter {info.adapter_id}: {pb.AdapterType.Name(info.type)}, "
                      f"{info.size_bytes / 1e3:.0f} kB, {pb.AdapterState.Name(info.state)}")
    finally:
        _stop([job.proc for job in trainings])  # only if something above failed: they are done otherwise
        _step("5. stopping the daemon (SIGTERM)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        print(f"daemon exited with {code}")
    return 0
