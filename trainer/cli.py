"""``adapterd train``: train a LoRA or P-Tuning v2 adapter; runs in the foreground, under ``nohup``, or under
``torchrun --nproc-per-node N -m adapterd.cli train ...`` for data parallel on one host.

SIGTERM or SIGINT (or a file ``RUN_DIR/STOP``) stops the run after the current step: a checkpoint is
written, status.json says ``stopped``, and the exit status is 0. ``--resume`` continues from the newest
checkpoint; ``--resume checkpoint-N`` from that one. With ``--resume``, options left out are taken from the
run's saved ``train_config.json``, so ``adapterd train --output RUN_DIR --resume`` is enough.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from adapterd.trainer.config import ConfigError, TrainConfig, add_config_arguments, cli_fields

HELP = ("Train a LoRA or P-Tuning v2 adapter on Alpaca-style data (JSON list or JSON lines); writes "
        "checkpoints, status.json and train.log to the run directory.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    for action in parser._actions:  # --base/--data/--method come from the saved config on --resume
        if action.dest in ("base", "data"):
            action.required = False
    parser.add_argument("--resume", nargs="?", const="latest", default="", metavar="CHECKPOINT",
                        help="continue the run in --output from its newest checkpoint, or from CHECKPOINT "
                             "(checkpoint-N or a path)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def _config(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    saved_path = Path(args.output) / "train_config.json"
    if args.resume and saved_path.is_file():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name, value in values.items():
            if name in saved and (value == defaults[name] or value in ("", None)):
                values[name] = saved[name]
    values["resume"] = args.resume
    return TrainConfig.from_dict(values)


def _install_stop_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: stop at once
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop.set()
        logging.getLogger("adapterd.trainer").warning("signal %d: stopping after this step", signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    _install_stop_handlers(stop)  # first thing: a stop that arrives while torch imports is not lost
    try:
        cfg = _config(args)
        cfg.validate()
    except ConfigError as exc:
        print(f"adapterd train: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty() and not args.no_progress
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if tty else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("adapterd.trainer").addHandler(console)

    from adapterd.trainer.loop import train  # torch and transformers load here, after the handlers

    try:
        result = train(cfg, stop=stop, progress=tty)
    except Exception as exc:
        print(f"adapterd train: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
        return 0
    print(f"adapterd train: {result['state']} at step {result['step']}/{result['total_steps']}; "
          f"run directory {cfg.output}", file=sys.stderr)
    return 0
