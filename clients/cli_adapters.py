"""``adapterd adapters [list|load ID|unload ID]``."""

from __future__ import annotations

import argparse
import sys
import time

from .cli_generate import add_common, connect

HELP = "List the adapters of a running adapterd, or load / unload one."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("action", nargs="?", default="list", choices=["list", "load", "unload"])
    parser.add_argument("adapter_id", nargs="?", default="")


def _row(info) -> list[str]:
    from ..v1 import adapterd_pb2 as pb

    shape = f"r={info.rank}" if info.rank else (f"v={info.num_virtual_tokens}" if info.num_virtual_tokens else "")
    used = time.strftime("%H:%M:%S", time.localtime(info.last_used_unix)) if info.last_used_unix else "-"
    return [info.adapter_id, pb.AdapterType.Name(info.type), shape, ",".join(info.target_modules) or "-",
            f"{info.size_bytes / 1e6:.2f} MB", pb.AdapterState.Name(info.state), used]


def run(args: argparse.Namespace) -> int:
    import grpc

    with connect(args) as client:
        try:
            if args.action == "list":
                infos = client.list_adapters()
            elif not args.adapter_id:
                print(f"adapterd adapters {args.action}: give an adapter id", file=sys.stderr)
                return 2
            elif args.action == "load":
                infos = [client.load_adapter(args.adapter_id)]
            else:
                infos = [client.unload_adapter(args.adapter_id)]
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    header = ["ID", "TYPE", "SHAPE", "TARGETS", "SIZE", "STATE", "LAST USED"]
    rows = [_row(i) for i in infos]
    if any(i.error for i in infos):  # why each LOAD_FAILED adapter failed; last, since it is the widest
        header.append("REASON")
        rows = [row + [" ".join(info.error.split()) or "-"] for row, info in zip(rows, infos, strict=True)]
    table = [header, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
