"""``adapterd generate --adapter ID --prompt TEXT``: stream an answer to the terminal.

The prompt goes as one user message (after ``--system TEXT``, if given), which the daemon renders with the
adapter's chat template, the one it was trained with, as the reference tutorial's ``inference_hf.py`` goes
through the model's chat format; ``--raw`` sends the text as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
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


def _usage_error(message: str) -> typing.NoReturn:
    """One line on stderr and exit 2, as argparse ends a usage error (no traceback)."""
    print(f"adapterd: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        _usage_error(f"{flag} {path}: {exc.strerror}")


def connect(args: argparse.Namespace) -> Any:
    """An ``AdapterdClient`` from the common flags. The token comes from --token, else ``ADAPTERD_TOKEN``
    (an environment variable keeps it out of the process list and the shell history)."""
    import grpc

    from .client import AdapterdClient

    if (args.tls_cert is None) != (args.tls_key is None):
        _usage_error("--tls-cert and --tls-key go together")
    credentials = None
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(args.tls_ca, "--tls-ca"),
                                                   private_key=_read(args.tls_key, "--tls-key"),
                                                   certificate_chain=_read(args.tls_cert, "--tls-cert"))
    token = args.token or os.environ.get("ADAPTERD_TOKEN") or None
    return AdapterdClient(args.target, token=token, credentials=credentials)


def count(text: str) -> int:
    """A whole number >= 0 (the request's fields are unsigned): argparse names the flag if not."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """The flags of one generation, shared by ``generate`` and ``chat``."""
    parser.add_argument("--adapter", default="", help="adapter id under the daemon's adapter root (empty: base)")
    parser.add_argument("--system", default=None, help="a system message before the prompt (chat templates "
                                                       "place it; with the Alpaca template it replaces the header)")
    parser.add_argument("--max-new-tokens", type=count, default=0, help="most tokens to generate (default: 0, the "
                                                                      "daemon's --default-max-new-tokens)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-k", type=count, default=0, help="sample from the k likeliest tokens (default: 0, off)")
    parser.add_argument("--top-p", type=float, default=0.0, help="sample from the smallest set of tokens whose "
                                                                 "probabilities add up to p (default: 0, off)")
    parser.add_argument("--seed", type=count, default=None, help="sampling seed, for a repeatable answer "
                                                               "(default: random, chosen by the daemon)")
    parser.add_argument("--truncate-input-tokens", type=count, default=0, metavar="N",
                        help="keep only the last N tokens of a longer prompt instead of refusing it "
                             "(default: 0, refuse)")
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input), sent as a user "
                                                       "message in the adapter's chat template")
    parser.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    add_sampling(parser)
    parser.add_argument("--no-stream", action="store_true", help="one unary call instead of a stream")


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "stop_sequences": args.stop,
            "truncate_input_tokens": args.truncate_input_tokens}


def system_message(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def answer(client: Any, request: dict[str, Any], adapter: str, params: dict[str, Any],
           stream: bool = True) -> tuple[str, int, int]:
    """Print the answer to ``request`` (``{"prompt": ...}`` or ``{"messages": [...]}``) as it comes; return its
    text, stop reason and token count. Raises grpc.RpcError."""
    if not stream:
        reply = client.generate(adapter_id=adapter, **request, **params)
        print(reply.text)
        return reply.text, reply.stop_reason, reply.generated_token_count
    parts, stop, count = [], 0, 0
    for message in client.generate_stream(adapter_id=adapter, **request, **params):
        print(message.text, end="", flush=True)
        parts.append(message.text)
        stop, count = message.stop_reason or stop, message.generated_token_count or count
    print()
    return "".join(parts), stop, count


def stop_note(stop: int, count: int) -> str:
    return f"[{count} tokens, {_STOP_NAMES.get(stop, stop)}]"


def run(args: argparse.Namespace) -> int:
    import grpc

    if args.raw and args.system:
        _usage_error("--system needs the chat template: it cannot go with --raw")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request: dict[str, Any] = ({"prompt": prompt} if args.raw else
                               {"messages": [*system_message(args), {"role": "user", "content": prompt}]})
    with connect(args) as client:
        try:
            _, stop, count = answer(client, request, args.adapter, sampling_params(args), not args.no_stream)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(stop_note(stop, count), file=sys.stderr)
    return 0
