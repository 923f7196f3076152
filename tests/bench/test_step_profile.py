"""step_profile's table: kernels ranked by device time a step, their families and shares (synthetic times:
the profiler itself needs a CUDA graph, which the GPU run of serve_bench --profile-dir exercises)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "bench"))

import step_profile  # noqa: E402


def test_families_of_the_kernels_a_decode_step_launches():
    assert step_profile.family("_int8_mm") == "split-K / int8 matmul"
    assert step_profile.family("_splitk_reduce") == "split-K / int8 matmul"
    assert step_profile.family("_rms_norm_rows") == "norm"
    assert step_profile.family("_rope_append") == "rotary + append"
    assert step_profile.family("_bgmv_shrink") == "LoRA"
    assert step_profile.family("_shrink") == step_profile.family("_expand") == "LoRA"  # lora_bgmv.py's names
    assert step_profile.family("pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention"
    # decode_attention.py's and silu_mul.py's kernels
    assert step_profile.family("_attention_partials") == step_profile.family("_attention_combine") == "attention"
    assert step_profile.family("_silu_mul") == "elementwise"
    assert step_profile.family("_gemv") == "dense GEMV (ours)"  # dense_gemv.py's; cuBLAS's stay dense matmul
    assert step_profile.family("gemv2T_kernel_val<int, int, __nv_bfloat16>") == "dense matmul"
    assert step_profile.family("nvjet_hsh_128x64_64x4_1x2_h_bz_NTT") == "dense matmul"
    assert step_profile.family("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"
    assert step_profile.family("something_new") == "other"


def test_table_ranks_kernels_and_sums_families():
    times = {"_int8_mm": (224.0, 2900.0), "_rms_norm_rows": (65.0, 130.0), "_rope_append": (32.0, 96.0),
             "void at::native::vectorized_elementwise_kernel<4>": (64.0, 150.0), "nvjet_gemv": (1.0, 70.0)}
    text = step_profile.table("int8, batch 1", times, wall_ms=3.5)
    head, kernels, families = text.split("\n\n")[0], text.split("\n\n")[1], text.split("\n\n")[2]
    assert "3.346 ms of kernels a step, 386 launches; 3.500 ms a replay" in head
    rows = [line for line in kernels.splitlines() if line.startswith("| _") or line.startswith("| void")
            or line.startswith("| nvjet")]
    assert rows[0].startswith("| _int8_mm | split-K / int8 matmul | 224 | 2900.0 | 86.7% |")
    assert [r.split(" | ")[0] for r in rows] == ["| _int8_mm", "| void at::native::vectorized_elementwise_kernel<4>",
                                                 "| _rms_norm_rows", "| _rope_append", "| nvjet_gemv"]
    assert "| split-K / int8 matmul | 224 | 2900.0 | 86.7% |" in families
    assert "| dense matmul | 1 | 70.0 | 2.1% |" in families


def test_table_without_kernels_says_so():
    assert "recorded no kernel" in step_profile.table("x", {}, wall_ms=1.0)


def test_table_folds_the_tail():
    times = {f"k{i}": (1.0, float(100 - i)) for i in range(step_profile.TOP + 5)}
    text = step_profile.table("many", times, wall_ms=1.0)
    assert "| (5 more) | | 5 |" in text
