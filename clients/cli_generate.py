"""``adapterd generate --adapter ID --prompt TEXT``: stream an answer to the terminal."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

HELP = "Generate text through a running adapterd, streaming it to the terminal."

_STOP_NAMES = {0: "not finished", 1: "max tokens", 2: "end of text", 3: "stop sequence", 4: "time limit",
               5: "cancelled", 6: "context full", 7: "error"}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="daemon address (host:port)")
    parser.add_argument("--token", default=None,
                        help="bearer token, if the daemon asks for one (default: $ADAPTERD_TOKEN)")
    parser.add_argument("--tls-ca", default=None, help="CA bundle (PEM) to verify the daemon by; turns on TLS "
                                                       "(without it, --tls-cert alone uses the system roots)")
    parser.add_argument("--tls-cert", default=None, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", default=None, help="client private key (PEM), for mutual TLS")


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def connect(args: argparse.Namespace) -> Any:
    """An ``AdapterdClient`` from the common flags. The token comes from --token, else ``ADAPTERD_TOKEN``
    (an environment variable keeps it out of the process list and the shell history)."""
    import grpc

    from adapterd.clients.client import AdapterdClient

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    credentials = None
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(args.tls_ca),
                                                   private_key=_read(args.tls_key),
                                                   certificate_chain=_read(args.tls_cert))
    token = args.token or os.environ.get("ADAPTERD_TOKEN") or None
    return AdapterdClient(args.target, token=token, credentials=credentials)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--adapter", default="", help="adapter id under the daemon's adapter root (empty: base)")
    parser.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--no-stream", action="store_true", help="one unary call instead of a stream")


def run(args: argparse.Namespace) -> int:
    import grpc

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "stop_sequences": args.stop}
    with connect(args) as client:
        try:
            if args.no_stream:
                reply = client.generate(prompt, args.adapter, **params)
                print(reply.text)
                stop, count = reply.stop_reason, reply.generated_token_count
            else:
                stop, count = 0, 0
                for message in client.generate_stream(prompt, args.adapter, **params):
                    print(message.text, end="", flush=True)
                    stop, count = message.stop_reason or stop, message.generated_token_count or count
                print()
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(f"[{count} tokens, {_STOP_NAMES.get(stop, stop)}]", file=sys.stderr)
    return 0
