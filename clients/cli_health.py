"""``adapterd health``: ask a daemon's gRPC health service; exit 0 when SERVING (for HEALTHCHECK probes)."""

from __future__ import annotations

import argparse
import sys

HELP = "Check a running adapterd through grpc.health.v1: exit 0 when SERVING, 1 otherwise."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="daemon address (host:port)")
    parser.add_argument("--service", default="", help="service name ('' = the whole daemon)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.target}: {err.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {name}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
