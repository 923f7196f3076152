"""Issue 20's loss-curve figure: the trainer at its defaults against plain PEFT, 200 steps on the tutorial's data.

For each method (LoRA, P-Tuning v2) on the tiny model the tests build (common/tiny_model.py, offline, bf16 on
a GPU), on trainer/examples/gitclone.json, micro-batches of 2, seed 7, linear schedule, dropout 0.05:

  ours      ``adapterd train`` through its command line (a process of its own: liger's kernels patch
            transformers' module globals), at its defaults for the device: on CUDA bf16, ``--fused-loss auto``
            and ``--kernels auto`` (train.log's lines saying what ran are kept); the base unquantized, as the
            oracle's
  peft      bench/peft_oracle.py (plain PEFT + torch, none of adapterd's trainer code) in the trainer's dtype
            (bf16 on CUDA, fp32 on the CPU), same data order and seed (what the oracle's docstring documents)
  peft-alt  the same oracle in the other dtype (fp32 on CUDA, bf16 on the CPU)
  peft-eager  the same oracle in the trainer's dtype with transformers' eager attention instead of its default
            (sdpa)

Deviation at a step is |a - b| / |b|; a curve pair's figures are its largest (and at which step) and its mean
over the steps. **Noise** is how far plain PEFT's own curve moves from ``peft`` when nothing but its numerics
change, in two samples: its precision (``peft-alt`` against ``peft``: bf16 against fp32, the change a bf16 run
makes by itself) and its attention kernels (``peft-eager`` against ``peft``: two implementations of the same
attention, each rounding in its own order, as any other kernel of the same maths does). The noise is the larger
of the two by its largest deviation; each sample is reported. (Two identical runs would be a floor of zero here:
the tiny model's CUDA kernels are deterministic at these shapes, so that measures nothing.) The trainer is
**within noise** when its largest deviation from ``peft`` is no larger than the noise's largest deviation.
One step's loss hangs on the records its batch held; where a run *ended* does not: every run's final adapter
(ours, and each PEFT variant's, saved) is scored on every record by plain PEFT on the fp32 base in eval mode
(``adapter_loss``), and ours is **within noise at the end** when it is no farther from ``peft``'s than the
farthest PEFT variant.
At a22ebc4 the first sample alone decided, and the LoRA curve with liger's kernels read 7.3e-02 against its
5.5e-02 while the trainer with kernels and fused loss off matched ``peft`` exactly: the second sample says
whether another order of rounding in bf16 moves plain PEFT's own curve as far.
At fc938e1 the LoRA adapter ended 0.0051 above PEFT's while PEFT's variants ended within 0.0015: one sample each.
``--seeds 7,8,9`` repeats every run from each seed and says where the final adapters end over them
(``over_seeds``): ours' distance from PEFT's end against the variants', by an exact permutation test.

    python bench/loss_curve.py                          # the GPU's figure: JSON, per-step table, SVG per method
    bash bench/gpu_train.sh curve                       # the same, as the device call (in $OUT)
    bash bench/gpu_train.sh seeds                       # LoRA's runs from seeds 7, 8 and 9 (~6 min)
    python bench/loss_curve.py --append-from train_curve.json   # here: one row per method into RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from peft_oracle import adapter_loss, peft_losses
from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
DATA = REPO / "trainer" / "examples" / "gitclone.json"
SECTION = "## Training: the loss curve against plain PEFT (bench/loss_curve.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "method", "steps", "dtype", "trainer ran", "ours first -> last",
           "PEFT first -> last", "ours vs PEFT max (step) / mean", "noise max (step) / mean", "within noise")
# Learning rates that keep the tiny model's loss well above zero for 200 steps (near zero a relative deviation
# means little): LoRA 8.9 -> 0.46, P-Tuning v2 8.4 -> 2.1 on the CPU in fp32.
LR = {"lora": 3e-3, "ptuning-v2": 1e-2}
SEED, BATCH, VIRTUAL_TOKENS, DROPOUT = 7, 2, 16, 0.05
OTHER_ATTENTION = "eager"  # the oracle's second noise sample; transformers' default is sdpa
SEEDS_SECTION = "## Training: where the final adapters end over seeds (bench/loss_curve.py --seeds)"
SEEDS_COLUMNS = ("date (UTC)", "commit", "machine", "method", "steps", "flags", "seeds", "ours - PEFT per seed",
                 "PEFT variants - PEFT per seed (dtype, attention)", "PEFT over seeds", "p", "within noise")
ALPHA = 0.05  # the permutation test's level (over_seeds): "no" only where fewer than 5% of the splits put ours so far


def deviation(ours: list[float], ref: list[float]) -> dict:
    """Per-step relative deviation of ``ours`` from ``ref``: largest, at which step (1-based), mean."""
    devs = [abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True)]
    worst = max(range(len(devs)), key=devs.__getitem__)
    return {"max": devs[worst], "max_step": worst + 1, "mean": sum(devs) / len(devs)}


def final_spread(final: dict[str, float]) -> float:
    """How far the farthest of plain PEFT's variants ends from ``peft`` (each judged by ``adapter_loss``)."""
    return max(abs(final[name] - final["peft"]) for name in ("peft_alt", "peft_eager"))


def final_within_noise(final: dict[str, float]) -> bool:
    """Whether our adapter ends no farther from plain PEFT's than PEFT's own variants end from it."""
    return abs(final["ours"] - final["peft"]) <= final_spread(final)


def permutation_p(ours: Sequence[float], others: Sequence[float]) -> float:
    """Exact one-sided permutation test: the share of all ways to draw ``len(ours)`` of the pooled values whose
    mean is at least ours' mean (ours' own draw among them). Small: ours are larger than chance would make them.
    Its smallest value is 1 / C(len(pooled), len(ours)): 1/84 for 3 seeds against 6 variants, 1/15 for 2."""
    pooled = [*ours, *others]
    k = len(ours)
    target = sum(ours) / k - 1e-12  # ties count as "at least": the draw of ours itself is always one
    draws = list(itertools.combinations(range(len(pooled)), k))
    return sum(1 for draw in draws if sum(pooled[i] for i in draw) / k >= target) / len(draws)


def over_seeds(results: Sequence[dict]) -> dict:
    """Where our final adapter ends against plain PEFT's over several seeds (one run of each per seed, same flags).
    Per seed, ours' distance from ``peft``'s final loss and each PEFT variant's (fp32 or bf16, eager attention:
    the noise's samples, two a seed); ours is **within noise** unless the exact permutation test says its
    distances are larger than the variants' (p < ALPHA). Signed means show a bias's direction."""
    finals = [r["final_loss"] for r in results]
    ours = [f["ours"] - f["peft"] for f in finals]
    variants = [[f[name] - f["peft"] for name in ("peft_alt", "peft_eager")] for f in finals]
    flat = [d for pair in variants for d in pair]
    p = permutation_p([abs(d) for d in ours], [abs(d) for d in flat])
    return {"method": results[0]["method"], "flags": results[0].get("flags", ""), "steps": results[0]["steps"],
            "seeds": [r["seed"] for r in results], "ours_minus_peft": ours, "variants_minus_peft": variants,
            "ours_mean": sum(ours) / len(ours), "variants_mean": sum(flat) / len(flat),
            "peft_final": [f["peft"] for f in finals], "p": p, "within_noise": p >= ALPHA}


def trainer_curve(base: Path, method: str, steps: int, run_dir: Path,
                  extra: Sequence[str] = (), seed: int = SEED) -> tuple[list[float], list[str]]:
    """``adapterd train`` at its defaults (but the unquantized base, no eval split; ``extra``: more flags, later
    ones winning): per-step losses and the train.log lines that say which loss and kernels ran."""
    argv = [sys.executable, "-m", "adapterd.cli", "train", "--no-progress", "--base", str(base),
            "--data", str(DATA), "--method", method, "--output", str(run_dir), "--quantization", "none",
            "--batch-size", str(BATCH), "--max-steps", str(steps), "--learning-rate", str(LR[method]),
            "--seed", str(seed), "--schedule", "linear", "--eval-split", "0", "--save-steps", str(steps),
            "--lora-dropout", str(DROPOUT), "--num-virtual-tokens", str(VIRTUAL_TOKENS), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"adapterd train exited {done.returncode}: {done.stderr[-2000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    messages = [line.split(" ", 3)[-1] for line in (run_dir / "train.log").read_text().splitlines()]  # date time level
    said = [text for text in messages if text.startswith(("fused loss: ", "kernels: ", "loss: "))]
    return [json.loads(line)["loss"] for line in lines], said


def run_method(base: Path, method: str, steps: int, device: str, workdir: Path,
               variants: Sequence[str] = ("",), seed: int = SEED) -> list[dict]:
    """Plain PEFT's three curves once, then ours once per variant (more ``adapterd train`` flags; "" for none),
    all from ``seed`` (LoRA's initial A, the batches' order, dropout's masks)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the trainer's compute dtype there
    alt = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    kwargs = dict(steps=steps, batch_size=BATCH, lr=LR[method], seed=seed, device=device,
                  num_virtual_tokens=VIRTUAL_TOKENS, lora_dropout=DROPOUT)
    saved = {name: workdir / f"peft-{method}-{name}-{seed}" for name in ("peft", "peft_alt", "peft_eager")}
    peft = peft_losses(base, DATA, method, dtype=dtype, save_to=saved["peft"], **kwargs)
    peft_alt = peft_losses(base, DATA, method, dtype=alt, save_to=saved["peft_alt"], **kwargs)
    peft_eager = peft_losses(base, DATA, method, dtype=dtype, attn_implementation=OTHER_ATTENTION,
                             save_to=saved["peft_eager"], **kwargs)
    finals = {name: adapter_loss(base, DATA, path, device) for name, path in saved.items()}
    samples = {"noise_dtype": deviation(peft, peft_alt), "noise_attention": deviation(peft_eager, peft)}
    noise = max(samples.values(), key=lambda d: d["max"])
    results = []
    for i, flags in enumerate(variants):
        run_dir = workdir / f"run-{method}-{i}-{seed}"
        ours, said = trainer_curve(base, method, steps, run_dir, shlex.split(flags), seed)
        said = ([f"seed {seed}"] if seed != SEED else []) + ([f"flags: {flags}"] if flags else []) + said
        ours_dev = deviation(ours, peft)
        final = {"ours": adapter_loss(base, DATA, run_dir / "final", device), **finals}
        results.append({"method": method, "seed": seed, "flags": flags, "steps": steps, "lr": LR[method],
                        "dtype": str(dtype).removeprefix("torch."),
                        "alt_dtype": str(alt).removeprefix("torch."),
                        "trainer_said": said, "ours": ours, "peft": peft,
                        "peft_alt": peft_alt, "peft_eager": peft_eager, "ours_vs_peft": ours_dev,
                        "ours_vs_peft_alt": deviation(ours, peft_alt), **samples, "noise": noise,
                        "within_noise": ours_dev["max"] <= noise["max"], "final_loss": final,
                        "final_within_noise": final_within_noise(final)})
    return results


def report(r: dict) -> None:
    print(f"\n== {r['method']}: {r['steps']} steps, lr {r['lr']:g}, trainer in {r['dtype']}; "
          f"peft in {r['dtype']} and {r['alt_dtype']}", flush=True)
    for line in r["trainer_said"]:
        print("   trainer:", line)
    print(f"   {'step':>5} {'ours':>9} {'peft':>9} {'peft-alt':>9} {'ours/peft-1':>12}")
    every = max(1, r["steps"] // 20)
    for i in sorted({*range(0, r["steps"], every), r["steps"] - 1}):
        a, b, c = r["ours"][i], r["peft"][i], r["peft_alt"][i]
        print(f"   {i + 1:>5} {a:>9.4f} {b:>9.4f} {c:>9.4f} {a / b - 1:>+12.2e}")
    for name in ("ours_vs_peft", "ours_vs_peft_alt", "noise_dtype", "noise_attention", "noise"):
        if name in r:  # runs saved before 2026-12-02 13:00 have one sample
            d = r[name]
            print(f"   {name:<17} max {d['max']:.2e} (step {d['max_step']}), mean {d['mean']:.2e}")
    print(f"   within noise: {'yes' if r['within_noise'] else 'no'} (ours' largest deviation from peft "
          f"<= the largest of peft's own: {r['dtype']} against {r['alt_dtype']}, and {OTHER_ATTENTION} attention "
          "against sdpa)", flush=True)
    if "final_loss" in r:
        f = r["final_loss"]
        print(f"   final adapters' loss on every record (plain PEFT in fp32, eval): ours {f['ours']:.5f}, peft "
              f"{f['peft']:.5f}, peft-alt {f['peft_alt']:.5f}, peft-eager {f['peft_eager']:.5f}; within noise: "
              f"{'yes' if r['final_within_noise'] else 'no'} (|ours - peft| <= the largest |variant - peft|)",
              flush=True)


def report_seeds(summary: dict) -> None:
    flags = f" with {summary['flags']}" if summary["flags"] else ""
    print(f"\n== {summary['method']}{flags}: the final adapters over seeds {summary['seeds']}", flush=True)
    for seed, ours, (alt, eager), peft in zip(summary["seeds"], summary["ours_minus_peft"],
                                              summary["variants_minus_peft"], summary["peft_final"], strict=True):
        print(f"   seed {seed:>4}: peft {peft:.5f}; ours {ours:+.5f}, peft-alt {alt:+.5f}, peft-eager {eager:+.5f}")
    print(f"   mean: ours {summary['ours_mean']:+.5f}, PEFT's variants {summary['variants_mean']:+.5f}; permutation "
          f"p {summary['p']:.3f}: within noise {'yes' if summary['within_noise'] else 'no'} (no only where "
          f"p < {ALPHA})", flush=True)


def write_svg(r: dict, path: Path) -> None:
    """The three curves, loss against step, as a plain SVG (no plotting library on these machines)."""
    w, h, pad = 640, 360, 40
    curves = {"ours": ("#d62728", r["ours"]), f"peft {r['dtype']}": ("#1f77b4", r["peft"]),
              f"peft {r['alt_dtype']}": ("#7f7f7f", r["peft_alt"])}
    if "peft_eager" in r:
        curves[f"peft {r['dtype']}, {OTHER_ATTENTION} attention"] = ("#2ca02c", r["peft_eager"])
    top = max(max(c) for _, c in curves.values())
    n = r["steps"]

    def xy(i: int, v: float) -> str:
        return f"{pad + (w - 2 * pad) * i / max(1, n - 1):.1f},{h - pad - (h - 2 * pad) * v / top:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{pad}" y="20">{r["method"]}: loss per step, {n} steps (y from 0 to {top:.2f})</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>']
    for k, (name, (color, values)) in enumerate(curves.items()):
        points = " ".join(xy(i, v) for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.2" points="{points}"/>')
        parts.append(f'<text x="{w - 200}" y="{40 + 16 * k}" fill="{color}">{name}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n", encoding="utf-8")


def to_row(r: dict, machine: str, commit: str, date: str) -> dict[str, str]:
    ran = "; ".join(r["trainer_said"]) or "?"
    d, noise = r["ours_vs_peft"], r["noise"]
    return {"date (UTC)": date, "commit": commit, "machine": machine, "method": r["method"],
            "steps": str(r["steps"]), "dtype": r["dtype"], "trainer ran": ran.replace("|", "/"),
            "ours first -> last": f"{r['ours'][0]:.3f} -> {r['ours'][-1]:.3f}",
            "PEFT first -> last": f"{r['peft'][0]:.3f} -> {r['peft'][-1]:.3f}",
            "ours vs PEFT max (step) / mean": f"{d['max']:.1e} ({d['max_step']}) / {d['mean']:.1e}",
            "noise max (step) / mean": f"{noise['max']:.1e} ({noise['max_step']}) / {noise['mean']:.1e}"
                                       + _which_sample(r),
            "within noise": ("yes" if r["within_noise"] else "no") + _final_cell(r)}


def _final_cell(r: dict) -> str:
    """The final adapters' comparison for the table's last cell; "" for runs saved before it existed."""
    if "final_loss" not in r:
        return ""
    f = r["final_loss"]
    return (f"; final loss ours {f['ours']:.4f}, PEFT {f['peft']:.4f} (+-{final_spread(f):.4f}): "
            f"{'yes' if r['final_within_noise'] else 'no'}")


def _which_sample(r: dict) -> str:
    """Which noise sample was the larger, for the table: " (dtype)" or " (attention)"; "" for older runs."""
    for name in ("noise_dtype", "noise_attention"):
        if name in r and r[name] == r["noise"]:
            return f" ({name.removeprefix('noise_')})"
    return ""


def to_seeds_row(summary: dict, machine: str, commit: str, date: str) -> dict[str, str]:
    def signed(values: Sequence[float]) -> str:
        return " ".join(f"{v:+.4f}" for v in values)

    peft = summary["peft_final"]
    return {"date (UTC)": date, "commit": commit, "machine": machine, "method": summary["method"],
            "steps": str(summary["steps"]), "flags": summary["flags"] or "(defaults)",
            "seeds": ",".join(map(str, summary["seeds"])),
            "ours - PEFT per seed": f"{signed(summary['ours_minus_peft'])} (mean {summary['ours_mean']:+.4f})",
            "PEFT variants - PEFT per seed (dtype, attention)":
                "; ".join(signed(pair) for pair in summary["variants_minus_peft"])
                + f" (mean {summary['variants_mean']:+.4f})",
            "PEFT over seeds": f"{min(peft):.4f} to {max(peft):.4f}", "p": f"{summary['p']:.3f}",
            "within noise": "yes" if summary["within_noise"] else "no"}


def append_rows(saved: dict, results: Path) -> None:
    intro = ("The tiny model (common/tiny_model.py) on trainer/examples/gitclone.json, batch 2, seed 7, linear "
             "schedule: `adapterd train` at its defaults against plain PEFT (bench/peft_oracle.py) in the same "
             "dtype. Deviation = |ours - PEFT| / PEFT per step. Noise = plain PEFT's own largest deviation when only "
             "its numerics change: bf16 against fp32 and (rows from 2026-12-02 13:00 on) eager attention "
             "against sdpa, the larger of the two (each in train_curve.json); within noise = ours' largest "
             "deviation <= the noise's largest. Final loss (rows from 2026-12-02 14:00 on): each run's final adapter "
             "scored on every record by plain PEFT in fp32 (bench/peft_oracle.py `adapter_loss`), ours against "
             "PEFT's, +- the largest distance of PEFT's own variants from it.")
    rows = [to_row(r, saved["machine"], saved["commit"], saved["date"]) for r in saved["results"]]
    print(f"appended to {results}:", *append_to_section(results, SECTION, intro, COLUMNS, rows), sep="\n")
    if saved.get("over_seeds"):
        intro = ("The curve's runs repeated from several seeds (each seed moves LoRA's initial A, the batches' "
                 "order and dropout's masks, for ours and PEFT alike), each final adapter scored as above. Per seed: "
                 "ours' final loss minus plain PEFT's, and PEFT's two variants' (the other dtype, eager "
                 "attention) minus PEFT's, the noise's samples. p: exact one-sided permutation test of ours' "
                 "|distances| against the variants' (ours farther than chance would put them when small); within "
                 f"noise unless p < {ALPHA}. With fewer than 3 seeds the test cannot say no.")
        rows = [to_seeds_row(x, saved["machine"], saved["commit"], saved["date"]) for x in saved["over_seeds"]]
        print(*append_to_section(results, SEEDS_SECTION, intro, SEEDS_COLUMNS, rows), sep="\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--methods", default="lora,ptuning-v2")
    p.add_argument("--workdir", type=Path, help="where the tiny model and the runs go (default: a temp dir)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--svg-dir", type=Path, help="write curve-METHOD.svg here")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--trainer-args", action="append",
                   help="more `adapterd train` flags for our side, e.g. --trainer-args='--kernels off'; repeated, "
                        "one curve of ours per value against the same PEFT curves (to find which part of the fast "
                        "path moves a curve; each row's 'trainer ran' names its flags)")
    p.add_argument("--seeds", default=str(SEED),
                   help="comma-separated seeds: every run once per seed, then where the final adapters end over "
                        "the seeds (over_seeds: 3 or more to be able to say 'no'); default %(default)s")
    p.add_argument("--append-from", type=Path, help="only append rows saved with --json-out, then exit")
    args = p.parse_args(argv)
    if args.append_from:
        append_rows(json.loads(args.append_from.read_text()), args.results)
        return 0
    import torch

    from adapterd.common.tiny_model import build_tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="adapterd-curve-"))
    base = workdir / "tiny-model"
    if not (base / "config.json").is_file():
        build_tiny_model(base)
    saved = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "device": device,
             "commit": git_commit("trainer", "bench/loss_curve.py", "bench/peft_oracle.py"),
             "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "results": [], "over_seeds": []}
    failed = False
    variants = args.trainer_args or [""]
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    for method in [m for m in args.methods.split(",") if m]:
        by_flags: dict[str, list[dict]] = {flags: [] for flags in variants}
        for seed in seeds:
            try:
                results = run_method(base, method, args.steps, device, workdir, variants, seed)
            except Exception as exc:  # one method or seed failing still leaves the others' figures
                print(f"{method}, seed {seed}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                failed = True
                continue
            for i, result in enumerate(results):
                report(result)
                saved["results"].append(result)
                by_flags[result["flags"]].append(result)
                if args.svg_dir:
                    args.svg_dir.mkdir(parents=True, exist_ok=True)
                    write_svg(result, args.svg_dir / _svg_name(method, i, len(results), seed, len(seeds)))
            if args.json_out:
                args.json_out.write_text(json.dumps(saved, indent=1))
        for runs in by_flags.values():
            if len(runs) > 1:
                saved["over_seeds"].append(over_seeds(runs))
                report_seeds(saved["over_seeds"][-1])
        if args.json_out:
            args.json_out.write_text(json.dumps(saved, indent=1))
    return 1 if failed else 0


def _svg_name(method: str, variant: int, variants: int, seed: int, seeds: int) -> str:
    """curve-METHOD.svg for one run; -N for the Nth variant of several, -sSEED for each of several seeds."""
    return (f"curve-{method}" + (f"-{variant + 1}" if variants > 1 else "") + (f"-s{seed}" if seeds > 1 else "")
            + ".svg")


if __name__ == "__main__":
    sys.exit(main())
