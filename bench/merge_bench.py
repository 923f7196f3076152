"""Benchmark of the streamed merge into full weights: time and peak RAM, appended to bench/RESULTS.md.

Builds a Llama-2-7B-shaped checkpoint with random weights in bf16 (sharded safetensors, 13.5 GB, written one
tensor at a time), an r=16 LoRA adapter on q/k/v/o (or every projection with ``--targets all``), then runs
``Merger.merge_to_model`` in a fresh subprocess that reports its wall time, its resident set before the
merge and its peak during it (Linux VmHWM, reset just before the merge). One merged tensor is checked
against ``W + scaling * B @ A`` computed independently. Needs about 2x the model's size free on disk
(``--workdir``); RAM need is what the run measures. ``--small`` runs a ~35 MB model in seconds.

    python bench/merge_bench.py                 # 7B shape (for the GPU host or any big-disk machine)
    python bench/merge_bench.py --small         # proves the pipeline works; appends a row for machine "cpu"
    python bench/merge_bench.py --json-out r.json --no-append   # on a remote host: keep the row for later
    python bench/merge_bench.py --append-from r.json            # then record it here

The base is read right after it was written, so it is usually in the page cache: the time is the merge's
CPU and write cost more than the read speed of a cold disk.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from results_table import append_to_section, git_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Merge into full weights (bench/merge_bench.py)"
COLUMNS = ("date (UTC)", "commit", "machine", "model", "adapter", "model GB", "merge s", "GB/s",
           "RSS before MB", "peak RSS MB", "peak growth MB", "check")


def import_merge():
    """The merge package: installed as ``adapterd.server.merge``, else straight from the checkout."""
    try:
        import adapterd.server.merge as merge
    except ImportError:
        sys.path.insert(0, str(REPO))
        import server.merge as merge  # type: ignore[no-redef]
    return merge


CHILD = """
import gc, json, sys, time
sys.path.insert(0, sys.argv[4])
try:
    from adapterd.server.merge import Merger
except ImportError:
    from server.merge import Merger

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

base, root, out = sys.argv[1:4]
merger = Merger(base, root)
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak from here on is the merge's
except OSError:
    pass  # not allowed here: VmHWM then includes start-up (imports), an overestimate
before = kib("VmRSS")
start = time.monotonic()
result = merger.merge_to_model([("lora", 1.0)], out)
seconds = time.monotonic() - start
print(json.dumps({"seconds": seconds, "rss_before_kib": before, "peak_kib": kib("VmHWM"),
                  "bytes_written": result.bytes_written, "tensors_merged": result.tensors_merged}))
"""



def describe_machine() -> str:
    """'cpu' or the GPU's name, with cores and RAM (the merge itself runs on the CPU either way)."""
    cores = os.cpu_count() or 0
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    kind = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            kind = f"{torch.cuda.get_device_name(0)} host"
    except ImportError:
        pass
    return f"{kind} ({cores} cores, {ram_gib:.0f} GiB RAM, {platform.machine()})"


def build_inputs(merge, work: Path, small: bool, rank: int, targets: str) -> dict[str, object]:
    """Write the random base and adapter; returns what the row reports about them."""
    import torch

    synth = importlib.import_module(f"{merge.__name__}.synthetic")
    shape = (synth.LlamaShape(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=8) if small else synth.LlamaShape())
    start = time.monotonic()
    size = synth.write_random_llama(work / "base", shape, dtype=torch.bfloat16,
                                    max_shard_bytes=(16 if small else 4096) * 1024**2)
    mods = synth.ATTN + synth.MLP if targets == "all" else synth.ATTN
    synth.write_random_lora(work / "adapters" / "lora", shape, r=rank, alpha=2 * rank, targets=mods)
    print(f"wrote {size / 1e9:.2f} GB base and r={rank} adapter in {time.monotonic() - start:.1f} s")
    label = "llama-2-7b shape" if not small else "small llama"
    return {"model": f"{label}, bf16, {shape.num_hidden_layers} layers", "model_bytes": size,
            "adapter": f"r={rank} {'all linear' if targets == 'all' else 'q,k,v,o'}", "shape": asdict(shape)}


def run_merge(work: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "base"), str(work / "adapters"),
                           str(work / "merged"), str(REPO)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_one_tensor(merge, work: Path) -> str:
    """Recompute layer 0's q_proj independently (fp32) and compare with the merged bf16 tensor."""
    import torch
    from safetensors import safe_open

    from adapterd.server.adapters.peft_format import LoraConfig, lora_modules, read_adapter

    name = "model.layers.0.self_attn.q_proj.weight"

    def read(model_dir: Path) -> torch.Tensor:
        index = model_dir / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(model_dir / file, "pt") as f:
            return f.get_tensor(name)

    adapter = work / "adapters" / "lora"
    files = read_adapter(adapter, adapter)  # the one reader of adapter directories, as the merger's
    delta = lora_modules(LoraConfig.from_dict(files.raw), files.tensors)["model.layers.0.self_attn.q_proj"].delta()
    want = (read(work / "base").float() + delta).to(torch.bfloat16)
    got = read(work / "merged")
    # one bf16 rounding apart at most (the merge fuses the add into addmm; this check does not)
    rel = ((got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)).max().item()
    return "ok" if rel <= 2**-7 else f"MISMATCH (max relative error {rel:.3g})"


def make_row(meta: dict[str, object], run: dict[str, object], check: str, machine: str,
             commit: str) -> dict[str, str]:
    gb = float(meta["model_bytes"]) / 1e9  # type: ignore[arg-type]
    seconds = float(run["seconds"])  # type: ignore[arg-type]
    before, peak = int(run["rss_before_kib"]) / 1024, int(run["peak_kib"]) / 1024  # type: ignore[call-overload]
    values = (datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), commit, machine, str(meta["model"]),
              str(meta["adapter"]), f"{gb:.2f}", f"{seconds:.1f}", f"{gb / seconds:.2f}", f"{before:.0f}",
              f"{peak:.0f}", f"{peak - before:.0f}", check)
    return dict(zip(COLUMNS, values, strict=True))


def append_row(row: dict[str, str], results: Path) -> None:
    """Add the row under this benchmark's section of RESULTS.md, creating the section if needed."""
    intro = ("Streamed merge of an r=16 LoRA into a random-weight bf16 base; peak RSS is the merge "
                  "process's (VmHWM), growth is peak minus the resident set just before the merge.")
    added = append_to_section(results, SECTION, intro, COLUMNS, [row])
    print(f"appended to {results}:", *added, sep="\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a ~35 MB model instead of the 7B shape")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", choices=("attn", "all"), default="attn", help="q,k,v,o or every projection")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    p.add_argument("--machine", help="machine description for the row (default: detected)")
    p.add_argument("--commit", help="commit for the row (default: git rev-parse of this checkout)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--json-out", type=Path, help="also write the row as JSON here")
    p.add_argument("--append-from", type=Path, help="only append a row saved with --json-out, then exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.append_from:
        append_row(json.loads(args.append_from.read_text()), args.results)
        return 0
    merge = import_merge()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        meta = build_inputs(merge, work, args.small, args.rank, args.targets)
        run = run_merge(work)
        check = check_one_tensor(merge, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    row = make_row(meta, run, check, args.machine or describe_machine(), args.commit or git_commit("server/merge"))
    print(json.dumps(row, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(row, indent=2) + "\n")
    if not args.no_append:
        append_row(row, args.results)
    return 0 if check == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
