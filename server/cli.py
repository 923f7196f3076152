"""``adapterd serve``: run the daemon.

Every option but ``--grace`` and ``--log-level`` (which belong to the process, not to the daemon) is generated
from :class:`ServerConfig`: the flag from the field's name, its type and choices from the field's type hint,
its help and default from the field, and its value checked while parsing by the field's own rule. torch is
imported only when the daemon runs, so ``adapterd serve --help`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any

from .config import Check, ConfigError, Kind, ServerConfig, between, check_value, flag_of, kind_of

HELP = "Serve one base causal LM with many LoRA and P-Tuning v2 adapters over gRPC."
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_NAMES = {int: "an integer", float: "a number"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        parser.add_argument(flag_of(f.name), dest=f.name, **_option(f))
    grace = _converter("grace", Kind(float, (), False), between(0, 86400))  # finite: timers are armed with it
    parser.add_argument("--grace", type=grace, default=30.0,
                        metavar="SECONDS", help="after SIGTERM, how long requests in flight get to finish before "
                                                "they are cancelled; the process ends within this plus 10 s "
                                                "(default: 30)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                        help="least severe log level written to stderr (default: INFO)")


def _option(f: Field) -> dict[str, Any]:
    """``add_argument``'s keywords for one config field."""
    kind = kind_of(f.name)
    required = f.default is MISSING
    default = None if required else f.default
    help_text = f.metadata.get("help", "")
    if kind.type is bool:  # --flag / --no-flag
        return {"action": argparse.BooleanOptionalAction, "default": default,
                "help": f"{help_text} (default: {'on' if default else 'off'})"}
    if default is not None:
        help_text += f" (default: {default})"
    option: dict[str, Any] = {"type": _converter(f.name, kind), "default": default, "required": required,
                              "help": help_text}
    if kind.choices:
        option["choices"] = kind.choices
    else:
        option["metavar"] = f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind.type, f.name.upper())
    return option


def _converter(name: str, kind: Kind, check: Check | None = None) -> Callable[[str], Any]:
    """text -> the field's type, checked by the field's rule; argparse reports a failure as
    ``argument --flag: <what is wrong>`` (one line, exit 2)."""

    def convert(text: str) -> Any:
        try:
            value = kind.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_NAMES.get(kind.type, kind.type.__name__)}, "
                                             f"not {text!r}") from None
        problem = check(value) if check is not None else check_value(name, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the parsed flags describe (the rules between fields are checked here)."""
    return ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"adapterd serve: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("settings (others at their defaults): %s", ", ".join(
        f"{flag_of(f.name)}={getattr(config, f.name)}" for f in fields(config) if getattr(config, f.name) != f.default))
    from .app import serve
    from .shutdown import SHUTDOWN_MARGIN_S

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one warning per 8-bit matmul otherwise
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a daemon's log is no terminal
    asyncio.run(serve(config, grace=args.grace))
    # The interpreter's own exit (atexit hooks, joining threads) gets the same margin as every shutdown step.
    faulthandler.dump_traceback_later(SHUTDOWN_MARGIN_S, exit=True)
    return 0
