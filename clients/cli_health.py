"""``adapterd health``: ask a daemon's gRPC health service; exit 0 when SERVING (for HEALTHCHECK probes).

The same connection flags as the other client commands, so that a probe reaches a daemon that serves TLS or
mutual TLS (health checks need no token)."""

from __future__ import annotations

import argparse
import sys

from .cli_generate import add_common, connect

HELP = "Check a running adapterd through grpc.health.v1: exit 0 when SERVING, 1 otherwise."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--service", default="", help="service name ('' = the whole daemon)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2

    with connect(args) as client:
        try:
            reply = client.health.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.target}: {err.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {name}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
