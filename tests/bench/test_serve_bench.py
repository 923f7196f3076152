"""The serving benchmark's CPU variant on a tiny model: it runs end to end, and two ratios measured within
one run guard against gross regressions (a per-row Python loop over adapters, a reload on every request).
Ratios only, with wide margins: no absolute timings are asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_serve_bench_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "serve_bench.py"), "--shape", "tiny",
                          "--quantizations", "none", "--decoders", "own,transformers", "--ctx", "32", "--new", "8",
                          "--batch", "8", "--work", str(tmp_path), "--no-record",
                          "--profile-dir", str(tmp_path / "profile")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # No CUDA graphs on the CPU: --profile-dir says so for each graph instead of failing the run.
    assert text.count("profile: no captured decode graph") == 6, text
    for decoder in ("own", "transformers"):
        label = f"float32, {decoder} forward"
        for measure in ("batch-1 decode ms/token", "batch-8 tok/s, {}, base only", "batch-8 tok/s, {}, 8 distinct LoRA",
                        "time to first token", "cold LoRA load r16"):
            assert measure.format(label) in text, (measure, decoder)
        mixed_over_base = float(re.search(rf"8 adapters over base-only, {label}\s+([\d.]+)", text)[1])
        assert mixed_over_base > 0.25, text
        load = re.search(rf"cold LoRA load r16 disk->slot p50, {label}\s+baseline\s+([\d.]+) ms\s+adapterd\s+"
                         r"([\d.]+) ms", text)
        assert float(load[2]) < float(load[1]), "a cold load must beat PEFT's load_adapter"
        # On fp32 the fast path must give the oracles' own greedy tokens, judged teacher-forced: transformers
        # for the base rows, PEFT with each row's adapter for the LoRA rows.
        for rows, oracle in (("base", "transformers"), ("LoRA", "PEFT on transformers")):
            judged = re.search(rf"{rows} rows, {label}, judged by {oracle} \(teacher-forced\)\s+top token (\d+)%",
                               text)
            assert judged and int(judged[1]) == 100, (rows, decoder, text)
        # fp32 on the CPU: a request's tokens do not depend on the batch around it (4 probes, 4 other rows).
        invariance = re.search(rf"batch invariance, {label}: 4 requests alone vs in 8 rows\s+identical (\d+)%", text)
        assert invariance and int(invariance[1]) == 100, (decoder, text)


def test_set_switches_a_server_attribute_for_the_run_and_refuses_a_typo(tmp_path):
    """``--set`` flips a switch for the run and the run says so; a module or attribute that does not exist, or a
    value that is no Python literal, is refused before anything is measured (a typo must not measure the default
    under another name)."""
    def run(*setting: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, str(REPO / "bench" / "serve_bench.py"), "--shape", "tiny",
                               "--quantizations", "none", "--ctx", "16", "--new", "4", "--batch", "8",
                               "--work", str(tmp_path), "--no-record", *setting],
                              capture_output=True, text=True, timeout=600, env=env)

    for setting, error in (("kernels.int8_shrink.IN_MATMULL=False", "has no IN_MATMULL"),
                           ("kernels.no_such_module.X=1", "no module adapterd.server.kernels.no_such_module"),
                           ("kernels.int8_shrink.IN_MATMUL=off", "'off' (for kernels.int8_shrink.IN_MATMUL) is not a"),
                           ("IN_MATMUL", "is not <module>.<attribute>=<value>")):
        refused = run("--set", setting)
        assert refused.returncode == 2 and error in refused.stderr, (setting, refused.stderr[-2000:])
    done = run("--set", "kernels.int8_shrink.IN_MATMUL=False", "--set", "kernels.int8_matmul.REDUCE_PDL=False")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("switches set for the run: kernels.int8_shrink.IN_MATMUL=False, kernels.int8_matmul.REDUCE_PDL=False"
            in done.stdout), done.stdout[:2000]
