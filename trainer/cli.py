"""``adapterd train``: train a LoRA or P-Tuning v2 adapter; runs in the foreground, under ``nohup``, or under
``torchrun --nproc-per-node N -m adapterd.cli train ...`` for data parallel on one host.

SIGTERM or SIGINT (or a file ``RUN_DIR/STOP``) stops the run after the current step: a checkpoint is
written, status.json says ``stopped``, and the exit status is 0. ``--resume`` continues from the newest
checkpoint; ``--resume checkpoint-N`` from that one. With ``--resume``, options left out are taken from the
run's saved ``train_config.json``, so ``adapterd train --output RUN_DIR --resume`` is enough.

``--resume`` of a completed run (same ``--max-steps`` / ``--epochs``) says so in one line, changes nothing
and exits 0: the run is where the resume would take it, and a scheduler that re-issues ``--resume`` after a
preemption must not count a finished run as an error. A second trainer on a run directory that a live one
holds is refused (exit 2). A ``STOP`` file older than the trainer (left by an earlier stop) is removed with a
warning; a newer one stops the run and is removed once honoured.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, add_config_arguments, cli_fields
from .resume import check_resume_config, completed_run, export_missing, saved_config
from .runlock import RunBusy

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
    saved = saved_config(Path(args.output)) if args.resume else None
    if saved is not None:
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


def _report(message: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (it reports for all)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"adapterd train: {message}", file=sys.stderr)


def _bad_data(record: logging.LogRecord, error: tuple[type[Exception], ...]) -> bool:
    """Whether ``record`` is the loop's failure log for bad input (``error``: DataError, ConfigError)."""
    return record.exc_info is not None and isinstance(record.exc_info[1], error)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    _install_stop_handlers(stop)  # first thing: a stop that arrives while torch imports is not lost
    started_unix = time.time()  # a STOP file older than this was meant for an earlier trainer
    try:
        cfg = _config(args)
        cfg.validate()
        done = completed_run(cfg)  # before torch loads: nothing to do, nothing to write
        if cfg.resume and done is None:  # a resume that would change the run: refused, nothing written
            check_resume_config(cfg.run_dir, cfg)
    except ConfigError as exc:
        print(f"adapterd train: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    if done is not None:
        exported = export_missing(cfg, done) if os.environ.get("RANK", "0") == "0" else None
        _report(f"run {cfg.output} already completed at step {done.get('step')}/{done.get('total_steps')}; "
                "nothing to do (--max-steps or --epochs above the run's would extend it)"
                + (f"; exported its final adapter again to {exported}" if exported else ""))
        return 0
    tty = sys.stderr.isatty() and not args.no_progress
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if tty else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("adapterd.trainer").addHandler(console)

    from .data import DataError
    from .loop import train  # torch and transformers load here, after the handlers

    console.addFilter(lambda record: not _bad_data(record, (DataError, ConfigError)))  # reported in one line
    try:
        result = train(cfg, stop=stop, progress=tty, started_unix=started_unix)
    except RunBusy as exc:
        print(f"adapterd train: --output: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # an option the base cannot serve (--prompt-format chat without a template)
        _report(f"--{exc.field.replace('_', '-')}: {exc.message}")
        return 2
    except DataError as exc:  # the input's fault, not a crash: train.log keeps the traceback
        _report(f"--data {cfg.data}: {exc}")
        return 2
    except Exception as exc:
        print(f"adapterd train: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _report(f"{result['state']} at step {result['step']}/{result['total_steps']}; run directory {cfg.output}")
    return 0
