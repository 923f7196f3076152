"""bench/gpu_decode.sh, the next GPU session's script for issue 18, runs each of its parts end to end on the CPU
with the tiny shape (its override variables), so that the device time is not lost to a wrong flag or path:
every log and JSON file it promises lands in $OUT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "bench"))


def run_part(tmp_path: Path, *part: str, **env_extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", **env_extra,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_decode.sh"), *part], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


@pytest.mark.slow  # ~20 s: the tiny model served twice (both forwards)
def test_serve_part(tmp_path):
    done = run_part(tmp_path, "serve", "none", SERVE_ARGS=f"--shape tiny --ctx 32 --new 4 --batch 8 --no-record "
                    f"--lora-targets all --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "serve_none.log").read_text()
    assert "8 adapters on all linears over base-only, float32, own forward" in log, log[-3000:]
    for decoder in ("own", "transformers"):
        assert f"batch invariance, float32, {decoder} forward: 4 requests alone vs in 8 rows" in log
        assert f"fast-path LoRA rows, float32, {decoder} forward, judged by PEFT on transformers" in log
    assert (tmp_path / "out" / "RESULTS.md").is_file()


@pytest.mark.slow  # ~10 s: the tiny model served once (the own forward)
def test_first_part_serves_on_an_h200(tmp_path):
    """On an H200 (device_setup.sh's name for it) the part serves each quantization with the own forward only,
    then the float base again with FIRST_AB's switches (o_proj's expand in its float matmul's launch by default),
    into a log of its own."""
    done = run_part(tmp_path, "first", ADAPTERD_GPU_NAME="NVIDIA-H200", TRITON_CACHE_DIR=str(tmp_path / "none"),
                    FIRST_QUANTS="none", SERVE_ARGS=f"--shape tiny --ctx 32 --new 4 --batch 8 --no-record "
                    f"--work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "card: NVIDIA-H200" in done.stdout
    log = (tmp_path / "out" / "serve_none.log").read_text()
    assert "8 adapters over base-only, float32, own forward" in log and "transformers forward" not in log, log[-3000:]
    assert "switches set for the run" not in log
    ab = (tmp_path / "out" / "serve_none_ab.log").read_text()
    assert "switches set for the run: kernels.int8_expand.FLOAT_IN_MATMUL=True" in ab, ab[-3000:]
    assert "8 adapters over base-only, float32, own forward" in ab
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RESULTS.md", "serve_none.log",
                                                                      "serve_none_ab.log"]


def test_first_parts_ab_serve_is_skipped_with_an_empty_first_ab(tmp_path):
    done = run_part(tmp_path, "first", ADAPTERD_GPU_NAME="NVIDIA-H200", TRITON_CACHE_DIR=str(tmp_path / "none"),
                    FIRST_QUANTS="none", FIRST_AB="", SERVE_ARGS=f"--shape tiny --ctx 32 --new 4 --batch 8 "
                    f"--no-record --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RESULTS.md", "serve_none.log"]


def test_first_part_checks_on_any_other_card(tmp_path):
    """On another card (an H100 that came for an H200) the part runs the kernels' GPU tests, then the engine's."""
    done = run_part(tmp_path, "first", ADAPTERD_GPU_NAME="NVIDIA-H100-80GB-HBM3", TRITON_CACHE_DIR=str(tmp_path / "no"),
                    TEST_DEVICE="cpu", KERNEL_TEST_PATHS="tests/server/kernels/test_rms_norm.py",
                    TEST_PATHS="tests/server/engine/test_step_context.py")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "card: NVIDIA-H100-80GB-HBM3" in done.stdout
    assert re.search(r"\d+ skipped", (tmp_path / "out" / "kernel_tests.log").read_text())  # GPU tests: skipped here
    assert " passed" in (tmp_path / "out" / "engine_tests.log").read_text()
    assert not list((tmp_path / "out").glob("serve_*"))


@pytest.mark.slow  # ~60 s: the tiny model loaded once, its decode steps (eager here) each way for every switch
def test_pdl_part_runs_every_switch_in_one_process(tmp_path):
    """Every --switch name through the real command line in one run (float32 only: the CPU's switches have
    nothing to change, but each one's cases are measured both ways and printed under its name)."""
    from pdl_switches import SWITCHES

    done = run_part(tmp_path, "pdl", PDL_ARGS=f"--shape tiny --quantizations none --rows 1,3 --lora-rows 2 --ctx 16 "
                    f"--new 2 --switch {','.join(SWITCHES)} --lora-targets all --no-record --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "pdl.log").read_text()
    sections = dict(re.findall(r"^--switch (\w+):\n(.*?)(?=^--switch |\Z)", log, re.M | re.S))
    assert list(sections) == list(SWITCHES), log
    assert "judged: no float shape" in sections["gemv"] and "| float32 |" not in sections["gemv"]  # nothing judged
    for name, switch in SWITCHES.items():
        if switch.per_shape:
            continue
        cases = (("1 rows on 1 LoRA (all linears)", "3 rows on 3 LoRA (all linears)") if switch.every_row_lora
                 else ("1 rows", "3 rows", "2 rows on 2 LoRA (all linears)"))
        for what in cases:
            row = rf"^\| float32 \| {re.escape(what)} \| [\d.]+ / [\d.]+ \| [\d.]+ \|"
            assert re.search(row, sections[name], re.M), (name, what, sections[name])
        assert len(re.findall(r"^\| float32 \|", sections[name], re.M)) == len(cases), sections[name]
    assert (tmp_path / "out" / "RESULTS.md").is_file()


def test_pdl_bench_refuses_an_unknown_switch():
    typo = subprocess.run([sys.executable, str(REPO / "bench" / "pdl_bench.py"), "--shape", "tiny", "--no-record",
                           "--switch", "shrink,expnd"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert typo.returncode == 2 and "--switch: unknown switch expnd: choose from pdl, epilogues" in typo.stderr


@pytest.mark.slow  # ~15 s: the tiny model loaded and warmed up once
def test_tiles_part(tmp_path):
    done = run_part(tmp_path, "tiles",
                    TILE_ARGS=f"--shape tiny --ctx 16 --new 4 --no-record --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "tiles.log").read_text()
    assert "no one-row int8 key tuned" in log and "| " not in log, log  # the CPU: no int8 kernel tuned
    assert (tmp_path / "out" / "RESULTS.md").is_file()


@pytest.mark.slow  # ~15 s: the tiny model loaded once, each rung eager on the CPU
def test_gap_part(tmp_path):
    done = run_part(tmp_path, "gap", GAP_ARGS=f"--shape tiny --ctx 16 --steps 3 --no-record --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "gap.log").read_text()
    for rung in ("+ inputs", "+ fed tokens", "+ tokens out", "+ run ahead", "engine step (serve_bench's)"):
        assert re.search(rf"^\| {re.escape(rung)} \| [\d.]+ \|", log, re.M), (rung, log)
    assert "graph alone" not in log  # no graphs on the CPU
    assert (tmp_path / "out" / "RESULTS.md").is_file()


def test_attention_part(tmp_path):
    pytest.importorskip("triton")  # the "ours" variant, in Triton's interpreter here
    done = run_part(tmp_path, "attention", ATTENTION_ARGS="--device cpu --shape tiny --rows 2 --ctx 20 --bucket 32",
                    TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert [r["rows"] for r in results] == [2]
    assert all(results[0][v]["ok"] for v in ("eager", "compiled", "flex", "ours"))
    assert (tmp_path / "out" / "attention.log").is_file() and (tmp_path / "out" / "RESULTS.md").is_file()


@pytest.mark.slow  # ~30 s: three kernel benches in the Triton interpreter
def test_kernels_part(tmp_path):
    pytest.importorskip("triton")
    done = run_part(tmp_path, "kernels", KERNEL_ARGS="--rows 1 --iters 1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tables = json.loads((tmp_path / "out" / "int8.json").read_text())
    assert len(tables["kernel"]) == 2 and len(tables["library"]) == 2  # the two CPU shapes at M = 1
    assert json.loads((tmp_path / "out" / "lora.json").read_text())["results"]
    assert "int8pack" in (tmp_path / "out" / "int8_kernel.log").read_text()
    done = run_part(tmp_path, "torchao", KERNEL_ARGS="--rows 1 --iters 1")  # torchao absent here: its cells n/a
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    library = json.loads((tmp_path / "out" / "int8_torchao.json").read_text())["library"]
    assert [row["int8pack µs"] for row in library] == ["-", "-"]  # not asked for in this part


def test_tests_part(tmp_path):
    done = run_part(tmp_path, "tests", TEST_DEVICE="cpu", TEST_PATHS="tests/server/engine/test_step_context.py")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " passed" in (tmp_path / "out" / "engine_tests.log").read_text()


def test_a_part_leaves_the_triton_cache_for_the_next_fresh_machine(tmp_path):
    """device_setup.sh names the GPU and points Triton's cache at one folder; each part archives that folder to
    $OUT by GPU model, and the archive holds the cached kernels and autotune choices but no intermediate IR."""
    import tarfile

    cache = tmp_path / "triton-cache"
    (cache / "abc123").mkdir(parents=True)
    (cache / "abc123" / "int8_mm.cubin").write_bytes(b"\x7fELF" + bytes(100))
    (cache / "abc123" / "int8_mm.autotune.json").write_text('{"configs_timings": []}')
    for ir in ("ttir", "ttgir", "llir", "source"):  # left behind: not needed to load a cached kernel
        (cache / "abc123" / f"int8_mm.{ir}").write_text("module {}")
    done = run_part(tmp_path, "tests", TEST_DEVICE="cpu", TEST_PATHS="tests/server/engine/test_step_context.py",
                    ADAPTERD_GPU_NAME="NVIDIA-H200", TRITON_CACHE_DIR=str(cache))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "triton-NVIDIA-H200.tar.gz") as archive:
        names = {Path(name).as_posix().lstrip("./") for name in archive.getnames() if archive.getmember(name).isfile()}
    assert names == {"abc123/int8_mm.cubin", "abc123/int8_mm.autotune.json"}


def test_no_archive_without_a_gpu_name(tmp_path):  # the CPU runs above: nothing but the part's own files
    done = run_part(tmp_path, "tests", TEST_DEVICE="cpu", TEST_PATHS="tests/server/engine/test_step_context.py")
    assert done.returncode == 0 and not list((tmp_path / "out").glob("triton-*")), done.stdout[-2000:]


def test_unknown_part_is_refused(tmp_path):
    done = run_part(tmp_path, "everything")
    assert done.returncode == 2 and "usage: bash bench/gpu_decode.sh" in done.stderr


def test_pick_part(tmp_path):
    pytest.importorskip("triton")  # the kernel, in Triton's interpreter here
    done = run_part(tmp_path, "pick", PICK_ARGS="--device cpu --vocabs 300 --rows 1,3 --dtypes float32,bfloat16 "
                    "--no-record", TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "pick.log").read_text()
    for rows, dtype in ((1, "float32"), (3, "bfloat16")):
        assert re.search(rf"^\| 300 \| {rows} \| {dtype} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| yes \|$", log, re.M), log
    results = json.loads((tmp_path / "out" / "pick.json").read_text())["results"]
    assert len(results) == 4 and all(r["same"] for r in results)


@pytest.mark.slow  # ~30 s: two test files, then the tiny model's decode steps each way
def test_shrink_part(tmp_path):
    """The part's tests run with the shrink switched on for the run (the switch test passes, not skipped), then
    pdl_bench --switch shrink times it (on the CPU: the tiny float model, nothing to switch)."""
    pytest.importorskip("triton")
    done = run_part(tmp_path, "shrink", TEST_DEVICE="cpu",
                    TEST_PATHS="tests/test_switches.py "
                    "tests/server/kernels/test_int8_shrink.py::test_none_where_it_does_not_run",
                    PDL_ARGS=f"--shape tiny --quantizations none --rows 1 --ctx 16 --new 4 --switch shrink --no-record "
                    f"--work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "shrink_tests.log").read_text()
    assert re.search(r"\b3 passed\b", log) and "skipped" not in log, log[-2000:]
    pdl = (tmp_path / "out" / "pdl.log").read_text()
    assert re.search(r"^\| float32 \| 1 rows on 1 LoRA \| [\d.]+ / [\d.]+ \|", pdl, re.M), pdl[-2000:]


@pytest.mark.slow  # ~20 s: two test files, then the tiny model's decode steps each way
def test_dense_part(tmp_path):
    """The part's tests run with both switches on for the run (the switch test passes for each, not skipped), then
    pdl_bench --switch dense times it (on the CPU: the tiny float model, no kernel to switch to)."""
    pytest.importorskip("triton")
    done = run_part(tmp_path, "dense", TEST_DEVICE="cpu",
                    TEST_PATHS="tests/test_switches.py "
                    "tests/server/kernels/test_dense_splitk.py::test_leading_dimensions_and_the_engines_choice",
                    PDL_ARGS="--shape tiny --quantizations none --rows 2 --lora-rows 2 --ctx 16 --new 4 --switch dense "
                    f"--no-record --work {tmp_path / 'work'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "out" / "dense_tests.log").read_text()
    assert re.search(r"\b3 passed\b", log) and "skipped" not in log, log[-2000:]
    pdl = (tmp_path / "out" / "pdl.log").read_text()
    for what in ("2 rows", "2 rows on 2 LoRA"):
        assert re.search(rf"^\| float32 \| {what} \| [\d.]+ / [\d.]+ \|", pdl, re.M), pdl[-2000:]


@pytest.mark.slow  # ~20 s: the tiny model's decode steps each way, then two test files
def test_expand_part(tmp_path):
    """pdl_bench --switch expand times it first (on the CPU: the tiny float model, every row on LoRA), holding the
    --set setting both ways, then the part's tests run with the expand switched on for the run (the switch test
    passes, not skipped). A --set that names nothing is refused before anything loads."""
    pytest.importorskip("triton")
    done = run_part(tmp_path, "expand", TEST_DEVICE="cpu",
                    TEST_PATHS="tests/test_switches.py "
                    "tests/server/kernels/test_int8_expand.py::test_none_where_it_does_not_run",
                    PDL_ARGS="--shape tiny --quantizations none --rows 2 --ctx 16 --new 4 --switch expand "
                    f"--lora-targets all --no-record --work {tmp_path / 'work'} "
                    "--set kernels.int8_expand.PROGRAM_ELEMS=16384")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pdl = (tmp_path / "out" / "pdl.log").read_text()
    assert "set for both ways: kernels.int8_expand.PROGRAM_ELEMS=16384" in pdl, pdl[-2000:]
    assert re.search(r"^\| float32 \| 2 rows on 2 LoRA \(all linears\) \| [\d.]+ / [\d.]+ \|", pdl, re.M), pdl[-2000:]
    log = (tmp_path / "out" / "expand_tests.log").read_text()
    assert re.search(r"\b3 passed\b", log) and "skipped" not in log, log[-2000:]
    typo = subprocess.run([sys.executable, str(REPO / "bench" / "pdl_bench.py"), "--shape", "tiny", "--no-record",
                           "--set", "kernels.int8_expand.PROGRAM_ELEM=16384"], capture_output=True, text=True,
                          timeout=300)
    assert typo.returncode == 2 and "--set: adapterd.server.kernels.int8_expand has no PROGRAM_ELEM" in typo.stderr


@pytest.mark.slow  # ~40 s: the engine's fold tests against PEFT and the min-length parity tests, on the CPU
def test_folds_part(tmp_path):
    """The part's kernel tests (GPU-marked: skipped here) and its engine tests, these cut to two quick ones by
    TEST_PATHS (the suite runs the whole list on the CPU anyway)."""
    pytest.importorskip("triton")
    done = run_part(tmp_path, "folds", TEST_DEVICE="cpu",
                    TEST_PATHS="tests/server/adapters/test_lora_group.py::test_a_module_no_adapter_targets_stays_out_of_"
                    "the_group tests/server/engine/test_parity.py::test_a_minimum_length_bans_eos_as_transformers_does")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\d+ skipped", (tmp_path / "out" / "fold_kernels.log").read_text())  # GPU tests: skipped here
    log = (tmp_path / "out" / "fold_engine.log").read_text()
    assert re.search(r"\b3 passed\b", log) and "failed" not in log, log[-2000:]
