"""``adapterd convert``: checkpoints of other formats into what adapterd serves (offline, no daemon).

Examples::

    adapterd convert chatglm3 ./chatglm3-6b ./chatglm3-6b-glm
    adapterd convert chatglm3-adapter ./output/checkpoint-3000 ./adapters/ad --base ./chatglm3-6b-glm
"""

from __future__ import annotations

import argparse
import sys

HELP = ("Convert a ChatGLM3 base checkpoint into a transformers GlmForCausalLM directory (chatglm3), or a "
        "ChatGLM3 finetune_demo P-Tuning v2 or LoRA checkpoint into a PEFT adapter for it (chatglm3-adapter).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    base = sub.add_parser("chatglm3", help="a ChatGLM3 checkpoint (THUDM's layout) into GlmForCausalLM",
                          description="SRC: config.json, tokenizer.model and the weights (safetensors or .bin); "
                                      "DST: a new directory that `adapterd serve --base` loads.")
    adapter = sub.add_parser("chatglm3-adapter", help="a finetune_demo P-Tuning v2 or LoRA checkpoint into PEFT",
                             description="SRC: a finetune_demo checkpoint (P-Tuning v2: the prefix encoder's "
                                         "weights; LoRA: adapter_config.json and adapter_model.*); DST: a new "
                                         "adapter directory, e.g. under the daemon's --adapters root.")
    for p in (base, adapter):
        p.add_argument("src", metavar="SRC", help="the checkpoint directory to convert")
        p.add_argument("dst", metavar="DST", help="the directory to write (written whole, then renamed)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing DST of the same kind")
    adapter.add_argument("--base", required=True, help="the base directory `adapterd convert chatglm3` wrote")


def run(args: argparse.Namespace) -> int:
    from ..errors import AdapterdError

    try:
        message = _convert(args)
    except AdapterdError as exc:
        print(f"adapterd convert {args.kind}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"adapterd convert {args.kind}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(message)
    return 0


def _convert(args: argparse.Namespace) -> str:
    if args.kind == "chatglm3":
        from .chatglm3 import convert_chatglm3

        result = convert_chatglm3(args.src, args.dst, overwrite=args.overwrite)
        note = ("; the source also holds a P-Tuning v2 prefix encoder: `adapterd convert chatglm3-adapter` "
                "makes it an adapter" if result.has_prefix else "")
        return (f"wrote {result.output}: GlmForCausalLM, {result.tensors} tensors, "
                f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s{note}")
    from .chatglm3_adapter import convert_chatglm3_adapter

    done = convert_chatglm3_adapter(args.src, args.dst, args.base, overwrite=args.overwrite)
    return f"wrote {done.output}: PEFT {done.kind} adapter, {done.detail}"
