"""Which of liger-kernel's training kernels moves the LoRA gradients (issue 20, on the GPU).

At fc938e1 the loss curve (bench/loss_curve.py) ran within noise by its largest deviation, but the final
LoRA adapter of ``adapterd train`` scored 0.25898 on every record, against 0.25389 for plain PEFT's, while
PEFT's own variants (fp32, eager attention) ended within 0.0015 of it; with liger's kernels off the trainer
matches PEFT to the bit. One training run is a noisy witness of a bias; one gradient is not. This script takes
the tiny model of the curve (common/tiny_model.py) with a LoRA of the curve's shape (r 8, alpha 32, q_proj and
v_proj, dropout off; B drawn at random so that A gets a gradient too), and computes the adapter's gradient on
the tutorial's records and on a batch of random tokens:

  fp32         plain transformers + PEFT, the base in fp32: the reference
  bf16         the same in bf16 (the trainer's dtype on a GPU), non-reentrant gradient checkpointing as the
               trainer runs it: the error bf16 makes by itself
  +rope, +rms_norm, +swiglu, +all
               bf16 with liger's kernels patched in (trainer/kernels.py ``patch``), one at a time and together
  +rms_norm_oop, +all_oop
               the same with liger's RMSNorm out of place

and prints each one's relative L2 error against fp32 (over the whole gradient, and per LoRA matrix) and the
loss. A kernel that only rounds in another order stays near bf16's error; one that computes a different
gradient stands out. ``--json-out`` keeps the figures (tests/bench/test_kernel_grads.py holds the GPU assertion).

At e846096 no kernel stood out at the start (B at random). A bias that shows only once training has moved the
weights would not show there: ``--after-steps 0,100`` measures at the start and again at the adapter plain PEFT
(bench/peft_oracle.py, fp32, the curve's LoRA settings and seed) reaches after 100 steps of the curve's run.

    python3 bench/kernel_grads.py --json-out kernel_grads.json     # on the GPU (bench/gpu_train.sh grads)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_oracle import _batch, examples, peft_losses  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "trainer" / "examples" / "gitclone.json"
VARIANTS = {"bf16": (), "+rope": ("rope",), "+rms_norm": ("rms_norm",), "+rms_norm_oop": ("rms_norm",),
            "+swiglu": ("swiglu",), "+all": ("rope", "rms_norm", "swiglu"), "+all_oop": ("rope", "rms_norm", "swiglu")}
# *_oop: liger's RMSNorm with ``in_place=False`` (its backward writes dX into a buffer of its own instead of the
# incoming gradient's: liger made Gemma 2's norms out of place after the in-place one broke its convergence).


def _lora_model(base_dir: Path, dtype: torch.dtype, device: str, adapter: dict[str, torch.Tensor] | None,
                adapter_dir: Path | None = None):
    """The base in ``dtype`` with a LoRA of the curve's shape, dropout off: its weights ``adapter`` (a state of
    another such model), else those saved in ``adapter_dir`` (PEFT's format), else A as PEFT draws it and B at
    random."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        if adapter is None and adapter_dir is not None:
            state = load_file(os.fspath(Path(adapter_dir) / "adapter_model.safetensors"))
            if set_peft_model_state_dict(peft_model, state).unexpected_keys:
                raise ValueError(f"{adapter_dir}: not a LoRA of r 8 on q_proj and v_proj")
        elif adapter is None:  # B at random (PEFT starts it at zero, which leaves A without a gradient)
            torch.manual_seed(0)
            for name, p in named.items():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
        else:
            for name, p in named.items():
                p.copy_(adapter[name])
    return peft_model


def gradient(peft_model, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, each trainable parameter's gradient in fp32) of one forward and backward in train mode."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().float().clone() for n, p in peft_model.named_parameters()
                         if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 error against ``ref``: over the whole gradient, then per kind of LoRA matrix."""
    out = {"all": _rel(torch.cat([g.flatten() for g in grads.values()]),
                       torch.cat([ref[n].flatten() for n in grads]))}
    for kind in ("q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"):
        names = [n for n in grads if kind in n]
        out[kind] = _rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([ref[n].flatten() for n in names]))
    return out


def batches(base_dir: Path, device: str) -> dict[str, dict[str, torch.Tensor]]:
    """The tutorial's records in one batch (the curve's data), and 2 x 256 random tokens (longer rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = _batch(examples(tokenizer, DATA), pad)
    ids = torch.randint(3, len(tokenizer), (2, 256), generator=torch.Generator().manual_seed(1))
    noise = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {name: {k: v.to(device) for k, v in b.items()} for name, b in (("records", records), ("random", noise))}


def measure(base_dir: Path, device: str = "cuda", variants: tuple[str, ...] = tuple(VARIANTS),
            adapter_dir: Path | None = None) -> dict:
    """Each variant's loss and gradient error against fp32, per batch, at the adapter in ``adapter_dir`` (None:
    B at random)."""
    from adapterd.trainer import kernels

    fp32 = _lora_model(base_dir, torch.float32, device, None, adapter_dir)
    adapter = {n: p.detach().clone() for n, p in fp32.named_parameters() if p.requires_grad}
    data = batches(base_dir, device)
    reference = {name: gradient(fp32, batch) for name, batch in data.items()}
    del fp32
    bf16 = _lora_model(base_dir, torch.bfloat16, device, adapter)
    bf16.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    result: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "variants": {}}
    for variant in variants:
        parts = VARIANTS[variant]
        undo = kernels.patch(bf16.get_base_model(), parts)[0] if parts else (lambda: None)
        if variant.endswith("_oop"):
            for module in bf16.get_base_model().modules():
                if hasattr(module, "in_place"):
                    module.in_place = False
        try:
            row = {}
            for name, batch in data.items():
                loss, grads = gradient(bf16, batch)
                row[name] = {"loss": loss, "loss_fp32": reference[name][0],
                             "error": errors(grads, reference[name][1])}
            result["variants"][variant] = row
        finally:
            undo()
    return result


def trained_adapter(base_dir: Path, steps: int, device: str, out: Path) -> Path:
    """Plain PEFT's LoRA after ``steps`` of the loss curve's run (bench/loss_curve.py's settings: fp32, batch 2,
    lr 3e-3, seed 7, dropout 0.05), saved in ``out``."""
    peft_losses(base_dir, DATA, "lora", steps=steps, batch_size=2, lr=3e-3, seed=7, device=device,
                dtype=torch.float32, lora_dropout=0.05, save_to=out)
    return out


def table(result: dict) -> str:
    lines = [f"LoRA gradient's relative L2 error against fp32 ({result['device']}, {result['adapter']}):",
             f"{'variant':<10} {'batch':<8} {'loss':>9} {'all':>9} {'q.A':>9} {'q.B':>9} {'v.A':>9} {'v.B':>9}"]
    for variant, row in result["variants"].items():
        for name, r in row.items():
            e = r["error"]
            lines.append(f"{variant:<10} {name:<8} {r['loss']:9.5f} {e['all']:9.2e} {e['q_proj.lora_A']:9.2e} "
                         f"{e['q_proj.lora_B']:9.2e} {e['v_proj.lora_A']:9.2e} {e['v_proj.lora_B']:9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--after-steps", default="0",
                        help="comma-separated: measure at the adapter plain PEFT reaches after each many steps of the "
                             "loss curve's LoRA run (0: B at random, as at e846096); default %(default)s")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    from adapterd.common.tiny_model import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as work:
        base = Path(work) / "tiny"
        build_tiny_model(base)
        for steps in [int(n) for n in args.after_steps.split(",") if n]:
            adapter = trained_adapter(base, steps, args.device, Path(work) / f"lora-{steps}") if steps else None
            result = measure(base, args.device, tuple(args.variants.split(",")), adapter)
            result.update(after_steps=steps,
                          adapter=f"plain PEFT's LoRA after {steps} steps" if steps else "B at random")
            print(table(result), flush=True)
            results.append(result)
    if args.json_out:
        args.json_out.write_text(json.dumps({"measurements": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
