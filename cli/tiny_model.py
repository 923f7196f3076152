"""``adapterd tiny-model DIR``."""

from __future__ import annotations

import argparse

HELP = "Write a small random-weight Llama model with an offline-trained tokenizer (English and Chinese)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (created)")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size (the MLP is twice as wide)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    from ..common.tiny_model import TinyModelConfig, build_tiny_model

    cfg = TinyModelConfig(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                          num_hidden_layers=args.layers, seed=args.seed)
    out = build_tiny_model(args.dir, cfg)
    print(out)
    return 0
