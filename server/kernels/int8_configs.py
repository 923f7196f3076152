"""The int8 weight-only matmul's tile configs (``int8_matmul.py``): the split-K decode kernel's per row bucket
(with the GEMV tiles of the one-row bucket), the prefill GEMM's, and the interpreter's single ones; and the same
split-K kernel's tiles for float weights (``dense_splitk.py``). Autotuned per shape on the GPU
(``triton.autotune``, keyed by row bucket, N and K)."""

from __future__ import annotations

import triton


def _small_configs() -> list[triton.Config]:
    """Tiles for M <= 64 rows (``_prune_small`` picks the ones for a key: at most 28).

    BLOCK_M 16 (every bucket; more rows make more row blocks): BLOCK_N 32..256 and SPLIT_K 1..16 trade
    parallelism (N / BLOCK_N * SPLIT_K programs for 132 SMs) against per-program overhead and the partials'
    traffic; BLOCK_K 128..512 int8 bytes a row and 2-4 stages keep 8-48 KB of weight in flight a program.
    BLOCK_M 32 and 64 (only for the bucket of that size: one row block, each weight tile read once).
    BLOCK_M 1 (only for the 1-row bucket, batch-1 decode): a GEMV without tensor cores. A tensor-core tile has
    16 rows, 15 of them padding at M = 1, and its 32..256-column tiles give a 4096-row weight 16..128
    programs; 2..32-row GEMV tiles give 128..2048, each streaming whole weight rows, 2-32 KB a tile (16 bytes
    a thread a load, 8-16 loads in flight with the next tile's) and 16-64 fp32 sums a thread (on the H200,
    2026-12-03, 1024-column tiles of 4 or 8 rows at 2 rows a warp won every Llama shape, and 2048 columns did
    not help; the tiles of 4 rows a warp reuse each x value for twice the weight bytes: ~4.2 instructions a
    weight byte in the loop, against 4.6 at 2 rows a warp, by cuobjdump of the sm_90 cubin). K must be a
    multiple of 4 (words; the other shapes keep the tensor-core tiles). At M = 1
    the tensor-core configs read a 4096x4096 weight at 1.06 TB/s of the H200's 4.8 (bench/RESULTS.md, ccbaeb0);
    the autotuner keeps whichever is faster per shape."""
    narrow = [  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), BLOCK_M 16
        (32, 256, 1, 2, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 4), (128, 256, 1, 8, 3),
        (32, 256, 2, 2, 4), (64, 256, 2, 4, 3), (128, 256, 2, 8, 3),
        (32, 256, 4, 2, 4), (64, 256, 4, 4, 3), (128, 128, 4, 4, 4), (64, 512, 4, 8, 3), (256, 128, 4, 8, 3),
        (32, 256, 8, 2, 4), (64, 128, 8, 4, 4), (64, 256, 8, 4, 3), (128, 128, 8, 4, 3), (256, 128, 8, 8, 3),
        (32, 256, 16, 2, 3), (64, 128, 16, 4, 4), (64, 256, 16, 4, 2),
    ]
    wide = [(64, 256, 1, 4, 3), (128, 128, 1, 8, 3), (64, 256, 2, 4, 3), (64, 256, 4, 4, 3), (64, 128, 8, 4, 4)]
    gemv = [(2, 1024, 1, 1, 1), (4, 1024, 1, 2, 1), (8, 1024, 1, 4, 1), (16, 1024, 1, 8, 1), (8, 1024, 1, 2, 1),
            (16, 1024, 1, 4, 1), (32, 1024, 1, 8, 1), (8, 512, 1, 2, 1), (16, 512, 1, 4, 1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s}, num_warps=w, num_stages=st)
            for bm, tiles in ((16, narrow), (32, wide), (64, wide), (1, gemv)) for bn, bk, s, w, st in tiles]



def one_row_tiles() -> list[dict]:
    """The GEMV tiles of one split (``BLOCK_M`` 1, ``SPLIT_K`` 1) that a one-row key tunes among where K is a
    multiple of 4 (``_prune_small``), as launch kwargs: the tiles the one-row epilogues run."""
    return [c.all_kwargs() for c in _small_configs() if c.kwargs["BLOCK_M"] == 1 and c.kwargs["SPLIT_K"] == 1]


def _prune_small(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """For row bucket ``b``: BLOCK_M 16, plus BLOCK_M == b for b = 32, 64; SPLIT_K 16 only up to 16 rows (a
    32-64 row tile has work enough); no more splits than K tiles. At one row with K a multiple of 4, only the
    GEMV tiles (of one split): they won every Llama shape on the H200 (2026-12-03), and they are the tiles
    whose epilogues fold the next kernel in (``int8_epilogues.py``: the rotary + append after q/k/v, the SiLU
    product after gate/up; 2.600 -> 2.484 ms a one-row step with both, bench/pdl_bench.py at 01775c1), which a
    tensor-core or split pick for one shape switched off at random. Otherwise, of the tensor-core tiles at one
    row only those 128 or 256 columns wide (the only ones that came near the GEMV tiles)."""
    bucket, k = named_args["M_BUCKET"], named_args["K"]
    gemv = bucket == 1 and k % 4 == 0  # the GEMV reads the weight as 4-byte words
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] in (16, bucket)
            and (c.kwargs["BLOCK_M"] == 1) == gemv and (not gemv or c.kwargs["SPLIT_K"] == 1)
            and (bucket != 1 or c.kwargs["BLOCK_M"] == 1 or c.kwargs["BLOCK_N"] >= 128)
            and (c.kwargs["SPLIT_K"] < 16 or bucket <= 16)
            and c.kwargs["SPLIT_K"] <= triton.cdiv(k, c.kwargs["BLOCK_K"])]
    return kept or [c for c in configs if c.kwargs["BLOCK_M"] == 16 and c.kwargs["SPLIT_K"] == 1]


def _dense_configs() -> list[triton.Config]:
    """The split-K kernel's tiles for a float weight at 2-64 rows (``dense_splitk.py``; ``_prune_dense`` picks a
    key's: at most 25). Tensor-core tiles only (a float weight's one row is ``dense_gemv.py``'s). A bf16 weight
    tile is twice an int8 one's bytes, so BLOCK_K is 64-256 columns (128-512 bytes a weight row) and 3-4 stages
    keep 48-128 KB of weight in flight a program; BLOCK_M 16 for every bucket (32 and 64 rows read each weight
    tile 2 or 4 times, the later reads mostly from L2), BLOCK_M 32 / 64 for the bucket of that size (one row
    block). SPLIT_K 1-16: a 12288x4096 weight at BLOCK_N 128 has 96 column blocks for 132 SMs."""
    narrow = [  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), BLOCK_M 16
        (64, 128, 1, 4, 4), (128, 64, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 8, 3),
        (64, 128, 2, 4, 4), (128, 64, 2, 4, 4), (64, 256, 2, 4, 3), (128, 128, 2, 8, 3),
        (64, 128, 4, 4, 4), (128, 64, 4, 4, 4), (64, 256, 4, 4, 3), (32, 256, 4, 2, 4),
        (64, 128, 8, 4, 4), (32, 128, 8, 2, 4), (64, 64, 16, 4, 4),
    ]
    # One row block: 32-column tiles give a 12288-row weight 384 programs of one split (48 KB of shared memory
    # each at BLOCK_M 32, by Triton's metadata for sm_90), 64-column ones 192 for 132 SMs. The 32-column tile of
    # two splits at 4 warps takes 8 bytes of stack (ptxas, sm_90): 2 warps there, which take none.
    wide = [(32, 128, 1, 4, 4), (32, 256, 1, 4, 3), (64, 64, 1, 4, 4), (64, 128, 1, 4, 4), (128, 64, 1, 4, 4),
            (32, 128, 2, 2, 4), (64, 128, 2, 4, 3), (128, 128, 2, 8, 3), (64, 128, 4, 4, 3), (64, 64, 8, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s}, num_warps=w, num_stages=st)
            for bm, tiles in ((16, narrow), (32, wide), (64, wide)) for bn, bk, s, w, st in tiles]


# Shared memory a float weight's tile may take, all stages (x's tile and the weight's): under the 227 KB a block
# may have on sm_90 (and 163 KB on sm_80: a config over it fails to build there, and the autotuner skips it)
_DENSE_SMEM = 200 << 10


def _prune_dense(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """For row bucket ``b`` (2-64): BLOCK_M 16, and BLOCK_M == b for b = 32, 64; SPLIT_K 16 only up to 16 rows; no
    more splits than K tiles; the stages' tiles within ``_DENSE_SMEM`` at the operands' element sizes."""
    bucket, k = named_args["M_BUCKET"], named_args["K"]
    x_size, w_size = named_args["x_ptr"].element_size(), named_args["w_ptr"].element_size()

    def smem(c: triton.Config) -> int:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return c.num_stages * (bm * bk * x_size + bk * bn * w_size)

    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] in (16, bucket) and (c.kwargs["SPLIT_K"] < 16 or bucket <= 16)
            and c.kwargs["SPLIT_K"] <= triton.cdiv(k, c.kwargs["BLOCK_K"]) and smem(c) <= _DENSE_SMEM]
    return kept or [c for c in configs if c.kwargs["BLOCK_M"] == 16 and c.kwargs["SPLIT_K"] == 1][:1]


def _gemm_configs() -> list[triton.Config]:
    """Tiles for M > 64 rows (9 a key; the bf16 matmul tutorial's Hopper tiles, BLOCK_K 32/64). Shared memory
    a stage: BLOCK_M * BLOCK_K * 2 + BLOCK_K * BLOCK_N bytes, at most 32 KB (x3 stages)."""
    tiles = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 32, 8, 4), (128, 128, 32, 4, 4),
             (64, 128, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles]


# The interpreter's single configs: small tiles (it runs each program in numpy, and tests want speed).
_INTERPRET_SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}
_INTERPRET_GEMM = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def even_k(kernel):
    """``EVEN_K``: K a multiple of the tile's BLOCK_K (the loads need no mask)."""
    return triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(kernel)
