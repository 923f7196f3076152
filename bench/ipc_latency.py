"""One engine frame's way back to a front end: zmq PUSH/PULL (the old path) against ``core/frames.py`` (today's).

Issue 14's last line is the time to first token over gRPC within 2 ms of the engine alone; on the H200 it read
+2.1 to +2.5 ms in int8 with two zmq crossings on the token's way (bench/NOTES.md, "Where the TTFT hops go").
This measures one crossing alone, in the same run both ways: a sending thread (the engine thread) writes a
100-byte frame every ``--gap`` ms (idle in between, as at a first token), and a receiving asyncio loop (the
front end's) stamps its arrival. zmq hands the frame to an I/O thread on each side; ``FrameWriter`` writes it
into a Unix socket that the loop's own selector watches (``_OutputsProtocol`` in core/client.py).

    python3 bench/ipc_latency.py            # p50 and p90 one-way latency each way, and the ratio
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import zmq
import zmq.asyncio

from adapterd.server.core.frames import FrameReader, FrameWriter

FRAME = b"x" * 100


def _sender(send, count: int, gap: float, stamps: list[float], ready: threading.Event) -> None:
    ready.wait()
    time.sleep(0.2)
    for _ in range(count):
        time.sleep(gap)
        stamps.append(time.perf_counter())
        send(FRAME)


async def zmq_way(work: Path, count: int, gap: float) -> list[float]:
    address = f"ipc://{work}/zmq.sock"
    context = zmq.asyncio.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(address)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(address)
    stamps, ready, latencies = [], threading.Event(), []
    threading.Thread(target=_sender, args=(push.send, count, gap, stamps, ready), daemon=True).start()
    ready.set()
    for i in range(count):
        await pull.recv()
        latencies.append(time.perf_counter() - stamps[i])
    push.close(0)
    context.destroy(0)
    return latencies


async def frames_way(work: Path, count: int, gap: float) -> list[float]:
    loop = asyncio.get_running_loop()
    arrived: list[float] = []
    done = loop.create_future()

    class Receiver(asyncio.Protocol):
        def __init__(self) -> None:
            self.reader = FrameReader()

        def data_received(self, data: bytes) -> None:
            for _ in self.reader.feed(data):
                arrived.append(time.perf_counter())
            if len(arrived) == count and not done.done():
                done.set_result(None)

    path = str(work / "frames.sock")
    server = await loop.create_unix_server(Receiver, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    writer = FrameWriter(sock, max_frames=1000)
    stamps, ready = [], threading.Event()
    threading.Thread(target=_sender, args=(writer.send, count, gap, stamps, ready), daemon=True).start()
    ready.set()
    await done
    writer.close()
    server.close()
    return [a - s for a, s in zip(arrived, stamps, strict=True)]


def _us(values: list[float]) -> tuple[float, float]:
    kept = values[len(values) // 10:]  # the first tenth warms up
    return statistics.median(kept) * 1e6, statistics.quantiles(kept, n=10)[-1] * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000, help="frames each way, per round")
    parser.add_argument("--gap", type=float, default=3.0, help="ms between frames (the receiver idles)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the two ways alternating")
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"zmq": [], "frames": []}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            results["zmq"] += asyncio.run(zmq_way(Path(work), args.frames, args.gap / 1000))
            results["frames"] += asyncio.run(frames_way(Path(work), args.frames, args.gap / 1000))
    (zmq50, zmq90), (fr50, fr90) = _us(results["zmq"]), _us(results["frames"])
    print(f"one frame, a thread's send to an asyncio loop's receipt, {args.rounds} x {args.frames} each way, "
          f"{args.gap} ms apart, {os.cpu_count()} CPUs:")
    print(f"  zmq PUSH/PULL (ipc://)       p50 {zmq50:6.0f} us   p90 {zmq90:6.0f} us")
    print(f"  core/frames.py (Unix socket) p50 {fr50:6.0f} us   p90 {fr90:6.0f} us")
    print(f"  saved per crossing: p50 {zmq50 - fr50:.0f} us ({fr50 / zmq50:.2f} of zmq's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
