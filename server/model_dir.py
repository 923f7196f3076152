"""Checks of a base model directory before anything loads it: what start-up refuses, in one line naming what
is missing. Imports no torch (``adapterd serve`` checks its flags before loading anything heavy)."""

from __future__ import annotations

from pathlib import Path

# Any one of these makes a tokenizer (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tokenizer.tiktoken")


def check_base_dir(base: Path) -> None:
    """Fail at start-up, naming what is missing, rather than minutes later inside transformers (or, worse,
    with a port that stays NOT_SERVING): the base directory, its config.json, its tokenizer files."""
    if not base.is_dir():
        raise ValueError(f"base model directory {base} does not exist")
    if not (base / "config.json").is_file():
        raise ValueError(f"base model directory {base} has no config.json")
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"base model directory {base} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} "
                         "is there (save the tokenizer beside the weights: tokenizer.save_pretrained(DIR))")
