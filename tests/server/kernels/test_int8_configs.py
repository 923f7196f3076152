"""The int8 matmul's tile configs (server/kernels/int8_configs.py): what the autotuner may pick per row bucket."""

from __future__ import annotations

import pytest

kc = pytest.importorskip("adapterd.server.kernels.int8_configs", reason="needs triton (the dev extra, Linux)")


def test_small_m_gpu_configs_are_pruned_per_bucket():
    """The autotune space per key stays small (warm-up times each config of each (shape, bucket))."""
    configs = kc._small_configs()

    def kept(bucket, k=4096):
        return kc._prune_small(configs, {"M_BUCKET": bucket, "K": k})

    assert [len(kept(b)) for b in (1, 2, 4, 8, 16, 32, 64)] == [9] + [20] * 4 + [22, 22]
    # one row: the GEMV tiles of one split only (those the epilogues run: a tuned pick of other tiles for a
    # fused shape would switch its epilogue off)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]) for c in kept(1)} == {(1, 1)}
    assert all(c.kwargs["BLOCK_M"] != 1 for b in (2, 4, 8, 16, 32, 64) for c in kept(b))
    assert {c.kwargs["BLOCK_M"] for c in kept(64)} == {16, 64}
    assert all(c.kwargs["SPLIT_K"] <= -(-520 // c.kwargs["BLOCK_K"]) for c in kept(2, 520))
    assert {c.kwargs["BLOCK_M"] for c in kept(1, 4098)} == {16}  # K not whole 4-byte words: no GEMV tiles
    assert {c.kwargs["BLOCK_N"] for c in kept(1, 4098)} == {128, 256}
    assert len(kc._gemm_configs()) == 9
