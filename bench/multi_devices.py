"""load_bench's device comparison (``--devices cuda:0,cuda:1``): one daemon with one engine core on the first
device, then one with a core on every listed device (``adapterd serve --device cuda:0,cuda:1``), each driven by
the same closed-loop streams over gRPC whose adapters are drawn Zipf(1) from the bench's adapter ids, at each
stream count. Throughput of N cores over one core is the figure issue 21 asks for (>= 1.9x on two GPUs at 64
and 256 streams with 1,000 adapters); the router's counters say how the requests spread and how many spilled.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TARGET_RATIO = 1.9  # issue 21: two GPUs against one, 64 and 256 streams, 1,000 Zipf adapters
WARM_UP_S = 5.0  # streams before each measurement: first loads of the most popular adapters, graph captures


def _daemon(args: argparse.Namespace, base_dir: Path, root: Path, device: str, rows: int):
    from adapterd.server.app import DaemonThread
    from adapterd.server.config import ServerConfig

    return DaemonThread(ServerConfig(base=base_dir, adapters=root, quantization=args.quantization, port=0,
                                     device=device, max_batch_size=rows, lora_slots=args.slots,
                                     max_lora_rank=args.rank, max_new_tokens=max(1024, args.new),
                                     max_queue=100_000, frontends=args.frontends)).start()


def _measure(args: argparse.Namespace, base_dir: Path, root: Path, ids: list[str], device: str,
             streams: list[int], grpc_streams) -> tuple[dict[int, float], str]:
    """tok/s at each stream count for a daemon on ``device`` (one or several entries), and how its router
    spread the requests (empty with one core)."""
    daemon = _daemon(args, base_dir, root, device, max(streams))
    target = f"127.0.0.1:{daemon.port}"
    try:
        grpc_streams(target, max(streams), args.client_procs, WARM_UP_S, args.new, ids)
        figures = {n: grpc_streams(target, n, args.client_procs, args.duration, args.new, ids)[0] for n in streams}
        router = daemon.daemon.state.runtime
        spread = (f"requests per core {router.routed}, spills {router.spills}"
                  if hasattr(router, "routed") else "")
    finally:
        daemon.stop()
    return figures, spread


def compare_devices(args: argparse.Namespace, base_dir: Path, root: Path, ids: list[str], streams: list[int],
                    grpc_streams) -> list[str]:
    """Result lines: at each stream count, one core's tok/s, all of ``args.devices``'s, and their ratio.
    ``grpc_streams(target, streams, procs, duration, new, ids)``: load_bench's closed-loop gRPC streams."""
    devices = args.devices.split(",")
    one, _ = _measure(args, base_dir, root, ids, devices[0], streams, grpc_streams)
    many, spread = _measure(args, base_dir, root, ids, args.devices, streams, grpc_streams)
    lines = []
    for n in streams:
        ratio = many[n] / one[n]
        lines.append(f"{n} streams, {len(ids)} Zipf adapters: 1 core ({devices[0]}) {one[n]:.1f} tok/s, "
                     f"{len(devices)} cores ({args.devices}) {many[n]:.1f} tok/s: {ratio:.2f}x "
                     f"(target >= {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
        print(lines[-1], flush=True)
    lines.append(f"{len(devices)} cores' router: {spread}")
    return lines


def record_devices(args: argparse.Namespace, lines: list[str], commit: str) -> None:
    """Append the comparison to bench/RESULTS.md (unless ``--no-record``) with commit, date and machine."""
    machine = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
               else "CPU")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join([f"\n### load_bench --devices {args.devices}: {args.shape} on {machine}, commit {commit}, "
                      f"{when}", f"{args.adapters} adapter ids ({args.distinct} distinct r{args.rank} files), "
                      f"{args.slots} slots per core, {args.quantization} base, closed-loop gRPC streams from "
                      f"{args.client_procs} client processes, {args.duration:g} s per point, {args.new} new tokens "
                      "per request (bench/multi_devices.py).", "", *(f"- {line}" for line in lines)])
    print(text)
    if not args.no_record:
        with (Path(__file__).resolve().parent / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(text + "\n")
