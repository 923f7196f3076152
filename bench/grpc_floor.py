"""The floor of issue 14's TTFT line: what a bare gRPC server costs to deliver a stream's first message.

load_bench's TTFT line splits a time to first token into the prefill's own p50 and the rest of the way: over
gRPC as token ids that rest was 3.5-3.8 ms longer than the engine alone's on the 2-core CPU machine
(2026-12-02). This says how much of it any Python gRPC server pays. A server in a process of its own answers
a unary-stream call (the shape of ``GenerateStream``) with one small message, either at once or after its
handler has waited ``--wait`` ms for another thread (as a front end waits for the engine's first token: gRPC
sits idle meanwhile). A client in this process (a sync channel, as ``AdapterdClient``) times the call to its
first message, less the wait. Two servers: ``grpc.aio`` (adapterd's front ends) and the thread-pool server
(``grpc.server``), whose handler thread blocks on the engine instead of an event loop's future.

    python3 bench/grpc_floor.py                 # p50 / p90 per server, at once and after the wait
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

SERVERS = ("aio", "sync")


def _same(data: bytes) -> bytes:
    return data


def _handlers(handler) -> grpc.GenericRpcHandler:
    method = grpc.unary_stream_rpc_method_handler(handler, _same, _same)
    return grpc.method_handlers_generic_handler("floor.Floor", {"First": method})


def serve(kind: str, wait: float) -> None:
    """Serve on a free port, print it, run until killed."""
    if kind == "sync":
        def handler(request, context):
            if wait:
                woken = threading.Event()
                threading.Timer(wait, woken.set).start()  # the engine's first token, from another thread
                woken.wait()
            yield b"x"

        server = grpc.server(futures.ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers((_handlers(handler),))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        server.start()
        server.wait_for_termination()
        return

    async def async_handler(request, context):
        if wait:
            loop = asyncio.get_running_loop()
            woken = loop.create_future()

            def fire() -> None:
                time.sleep(wait)
                loop.call_soon_threadsafe(woken.set_result, None)

            threading.Thread(target=fire, daemon=True).start()
            await woken
        yield b"x"

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handlers(async_handler),))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def first_message_ms(port: int, wait: float, calls: int, warm_up: int = 20) -> list[float]:
    """Milliseconds from each call to its first message, less the server's wait, one call at a time."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream("/floor.Floor/First", request_serializer=_same, response_deserializer=_same)
        times = []
        for i in range(warm_up + calls):
            start = time.perf_counter()
            stream = call(b"go")
            next(stream)
            took = time.perf_counter() - start - wait
            for _ in stream:
                pass
            if i >= warm_up:
                times.append(took * 1000)
            time.sleep(0.005)
    return times


def measure(kind: str, wait: float, calls: int) -> list[float]:
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--wait", str(wait * 1000)],
                              stdout=subprocess.PIPE, text=True)
    try:
        return first_message_ms(int(server.stdout.readline()), wait, calls)
    finally:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per server and wait")
    parser.add_argument("--wait", type=float, default=20.0, help="the handler's wait, ms (an int8 7B prefill: ~20)")
    parser.add_argument("--rounds", type=int, default=2, help="each server and wait this many times, alternating")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.wait / 1000)
        return 0
    times: dict[tuple[str, float], list[float]] = {}
    for _ in range(args.rounds):
        for kind in args.servers.split(","):
            for wait in (0.0, args.wait / 1000):
                times.setdefault((kind, wait), []).extend(measure(kind, wait, args.calls))
    print(f"a unary-stream call's first message, one call at a time ({args.rounds} x {args.calls} calls each):")
    for (kind, wait), values in times.items():
        values.sort()
        when = f"after a {wait * 1000:.0f} ms wait" if wait else "at once"
        print(f"  {kind:<5} {when:<22} p50 {statistics.median(values):6.3f} ms  p90 "
              f"{values[int(0.9 * (len(values) - 1))]:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
