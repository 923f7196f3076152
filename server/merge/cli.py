"""``adapterd merge``: merge LoRA adapters into full weights or into a new adapter, offline (no daemon).

Examples::

    adapterd merge --base ./tiny --adapter-root ./adapters lora-qv --output-dir ./tiny-merged
    adapterd merge --base ./tiny --adapter-root ./adapters lora-a:0.7 lora-b:0.3 \\
        --output-adapter mixes/ab --strategy dare_ties --density 0.5 --seed 1
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

HELP = ("Merge LoRA adapters (ID or ID:WEIGHT, relative to --adapter-root) into a new model directory "
        "(--output-dir, streamed tensor by tensor) or into a new adapter (--output-adapter, with --strategy).")

STRATEGY_CHOICES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1GiB' / '123' -> bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1GiB)")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def parse_adapter(text: str) -> tuple[str, float]:
    """'team/lora:0.5' -> ('team/lora', 0.5); no weight means 1.0. Ids cannot hold ':'."""
    adapter_id, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return adapter_id, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad weight in {text!r}; use ID or ID:WEIGHT") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", type=parse_adapter, metavar="ID[:WEIGHT]",
                        help="adapters under --adapter-root, each with an optional weight (default 1.0)")
    parser.add_argument("--base", required=True, help="base model directory (its original safetensors files)")
    parser.add_argument("--adapter-root", default=".", help="directory the adapter ids are relative to")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-dir", help="write a merged full model directory here")
    out.add_argument("--output-adapter", help="write a combined adapter under --adapter-root with this id")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default="linear",
                        help="how adapters combine into a new adapter (PEFT's add_weighted_adapter)")
    parser.add_argument("--density", type=float, help="ties/dare: fraction of weights kept, in (0, 1]")
    parser.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total",
                        help="ties, dare_ties: elect each weight's sign by the sum of values or by the count")
    parser.add_argument("--seed", type=int, help="dare: seed for the random drop (default: random, printed)")
    parser.add_argument("--rank", type=int, default=0, help="svd: rank of the new adapter (0: largest input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--max-shard-size", type=parse_size, default="4GiB",
                        help="largest output shard file (default 4GiB); memory use does not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Bar:
    """A tqdm bar fed by the merger's progress callback (tensors done of total, bytes written)."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.bar: Any = None

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", file=sys.stderr)
        self.bar.set_postfix_str(f"{nbytes / 1e6:,.0f} MB written", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from ..errors import AdapterdError
    from .merger import Merger

    merger = Merger(args.base, args.adapter_root, max_shard_bytes=args.max_shard_size)
    bar = _Bar(not args.no_progress, "merging")
    try:
        if args.output_dir:
            result = merger.merge_to_model(args.adapters, args.output_dir, overwrite=args.overwrite, progress=bar)
        else:
            result = merger.merge_to_adapter(
                args.adapters, args.output_adapter, strategy=args.strategy, density=args.density,
                majority_sign_method=args.majority_sign_method, seed=args.seed, rank=args.rank,
                overwrite=args.overwrite, progress=bar)
    except AdapterdError as exc:
        bar.close()
        print(f"adapterd merge: {exc.code.name}: {exc}", file=sys.stderr)
        return 2 if exc.code.name == "INVALID_ARGUMENT" else 1
    except KeyboardInterrupt:
        bar.close()
        print("adapterd merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    bar.close()
    extra = "".join(f", {k} {v}" for k, v in (("strategy", result.strategy), ("rank", result.rank),
                                             ("seed", result.seed)) if v is not None)
    print(f"wrote {result.kind} {result.output}: {result.tensors_merged}/{result.tensors_total} tensors merged, "
          f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s{extra}")
    return 0
