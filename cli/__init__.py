"""The ``adapterd`` command. Each sub-command lives beside the code it drives, in a module with
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; this table only names them, and a module is
imported only when its command runs (so ``adapterd generate`` never imports torch).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import typing

# Command -> its module, relative to this package (``..server.cli`` is ``adapterd.server.cli``).
COMMANDS: dict[str, str] = {
    "serve": "..server.cli",
    "generate": "..clients.cli_generate",
    "chat": "..clients.cli_chat",
    "adapters": "..clients.cli_adapters",
    "health": "..clients.cli_health",
    "train": "..trainer.cli",
    "merge": "..server.merge.cli",
    "convert": "..server.convert.cli",
    "tiny-model": ".tiny_model",
    "demo": ".demo",
}

# One-line help for each command, so that `adapterd --help` imports nothing heavy.
SUMMARIES: dict[str, str] = {
    "serve": "run the gRPC daemon: one base model, many adapters",
    "generate": "generate text through a running daemon (streams to the terminal)",
    "chat": "talk with an adapter through a running daemon, the conversation kept",
    "adapters": "list, load or unload adapters on a running daemon",
    "health": "check a running daemon's health (exit 0 when SERVING)",
    "train": "train a LoRA or P-Tuning v2 adapter on Alpaca-style data",
    "merge": "merge LoRA adapters into full weights or into a new adapter",
    "convert": "convert ChatGLM3 checkpoints (base, P-Tuning v2, LoRA) into what adapterd serves",
    "tiny-model": "write a small random-weight Llama model and tokenizer (offline)",
    "demo": "build the tiny model, train two adapters, serve them and query each",
}


def with_default(action: argparse.Action) -> str:
    """The option's help with its default, unless the help already speaks of it or there is none to show
    (None, off, empty)."""
    text, default = action.help or "", action.default
    hidden = (default is None or default is False or default is argparse.SUPPRESS
              or (isinstance(default, list | tuple | str) and not default))
    if hidden or not action.option_strings or "default" in text:
        return text
    return f"{text} (default: %(default)s)".lstrip()


class DefaultsShown(argparse.HelpFormatter):
    """``--help`` shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return with_default(action)


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the option, exit 2: the whole usage block of ``serve`` (40 options)
    would bury it, and ``--help`` is one word away. Every command's ``--help`` shows defaults."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: typing.Any, **kwargs: typing.Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None:  # without a help text argparse shows nothing, not even the default
            action.help = with_default(action) or None
        return action

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Output to a closed pipe (``adapterd adapters list | head -2``) ends the command
    quietly, as other Unix tools end (exit 128 + SIGPIPE), without a BrokenPipeError traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that this flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="adapterd", description="adapterd: one base model, many adapters")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in SUMMARIES.items():
        sub.add_parser(name, help=summary, add_help=False)
    # Parse the command name first, then let that command's module build its own parser.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]], __name__)
    cmd_parser = Parser(prog=f"adapterd {argv[0]}", description=module.HELP)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)
