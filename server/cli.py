"""``adapterd serve``: run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
from dataclasses import MISSING, fields

HELP = "Serve one base causal LM with many LoRA and P-Tuning v2 adapters over gRPC."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from adapterd.server.config import ServerConfig

    helps = ServerConfig.help_texts()
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if str(f.type) == "bool":  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{helps[f.name]} (default: {'on' if f.default else 'off'})")
            continue
        kind = {"int": int, "int | None": int}.get(str(f.type), str)
        required = f.name in ("base", "adapters")
        parser.add_argument(flag, type=kind, default=default, required=required,
                            help=helps[f.name] + (f" (default: {default})" if default is not None else ""))
    parser.add_argument("--grace", type=float, default=30.0, help="seconds for requests in flight at shutdown")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from adapterd.server.app import serve
    from adapterd.server.config import ServerConfig
    from adapterd.server.shutdown import SHUTDOWN_MARGIN_S

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one warning per 8-bit matmul otherwise
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a daemon's log is no terminal
    names = {f.name for f in fields(ServerConfig)}
    config = ServerConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    asyncio.run(serve(config, grace=args.grace))
    # The interpreter's own exit (atexit hooks, joining threads) gets the same margin as every shutdown step.
    faulthandler.dump_traceback_later(SHUTDOWN_MARGIN_S, exit=True)
    return 0
