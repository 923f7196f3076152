"""``adapterd chat --adapter ID``: a conversation in the terminal, each answer streamed as it comes.

Every line typed is a user message; the whole conversation so far (with ``--system``, if given) goes with
it, rendered by the daemon with the adapter's chat template, and the answer joins the conversation. End of
input (Ctrl-D) ends it; ``/reset`` starts a new one; empty lines are skipped. A failed turn says why and is
left out of the conversation.
"""

from __future__ import annotations

import argparse
import sys

from .cli_generate import add_common, add_sampling, answer, connect, sampling_params, stop_note
from .cli_generate import system_message as system

HELP = "Talk with an adapter through a running adapterd: each line a user message, the conversation kept."
RESET = "/reset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_sampling(parser)


def _prompt() -> str | None:
    """The next line typed, or None at the end of the conversation."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def run(args: argparse.Namespace) -> int:
    import grpc

    params = sampling_params(args)
    conversation = system(args)
    with connect(args) as client:
        while (line := _prompt()) is not None:
            if not line.strip():
                continue
            if line.strip() == RESET:
                conversation = system(args)
                continue
            turn = [*conversation, {"role": "user", "content": line}]
            try:
                text, stop, count = answer(client, {"messages": turn}, args.adapter, params)
            except grpc.RpcError as err:
                print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
                continue
            conversation = [*turn, {"role": "assistant", "content": text}]
            print(stop_note(stop, count), file=sys.stderr)
    return 0
