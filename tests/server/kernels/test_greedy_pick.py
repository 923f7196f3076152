"""The one-launch greedy pick against ``sampling_ops.greedy_pick`` (torch's argmax, isfinite and masked_fill: an
independent computation): the same token on every finite row, ties, bans and dtypes included, and the same
finite flags."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.engine.sampling_ops import greedy_pick as torch_pick
from adapterd.server.kernels import greedy_pick as gp


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(device)


def _check(logits: torch.Tensor, bans: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    assert gp.fits(logits, bans, eos)
    got, want = gp.greedy_pick(logits, bans, eos), torch_pick(logits, bans, eos)
    assert got.dtype == torch.long and got.shape == (logits.shape[0], 2)
    finite = want[:, 1] == 1
    assert torch.equal(got[:, 1], want[:, 1])
    assert torch.equal(got[finite, 0], want[finite, 0])
    assert bool(((got[:, 0] >= 0) & (got[:, 0] < logits.shape[1])).all())  # every token in range
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [5, 4096, 9001])
def test_the_argmax_of_each_row_with_its_bans(dtype, vocab):
    rows = 4
    logits = _logits(rows, vocab, dtype, seed=vocab)
    eos = torch.tensor([1, vocab - 1], dtype=torch.long) if vocab > 2 else torch.tensor([1])
    for row, column in enumerate([1, vocab - 1, 1, 0]):  # rows 0-2 have an EOS id as their favourite
        logits[row, column] = 100.0
    bans = torch.tensor([1, 1, 0, 1])
    got = _check(logits, bans, eos)
    assert got[0, 0] != 1 and got[1, 0] != vocab - 1 and got[2, 0] == 1 and got[3, 0] == 0


def test_ties_go_to_the_first_column_within_and_across_blocks():
    """bf16 logits tie often; torch.argmax takes the first column holding the largest value, and so must the
    pick, whether the tied columns share a lane, a block, or neither."""
    vocab = 3 * gp.BLOCK + 17
    logits = torch.zeros(5, vocab, dtype=torch.bfloat16)
    for row, columns in enumerate([[7, 7 + gp.BLOCK], [gp.BLOCK + 3, 5], [vocab - 1, vocab - 2],
                                   [0, 2 * gp.BLOCK], [12, 13, 14]]):
        logits[row, columns] = 2.0
    got = _check(logits, torch.zeros(5, dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert got[:, 0].tolist() == [7, 5, vocab - 2, 0, 12]


def test_non_finite_rows_are_flagged_and_still_get_a_column():
    logits = _logits(5, 300, torch.float32, seed=1)
    logits[0, 7] = float("nan")
    logits[1, 299] = float("inf")
    logits[2, 0] = float("-inf")
    logits[3] = float("-inf")
    got = _check(logits, torch.tensor([0, 0, 0, 0, 1]), torch.tensor([4]))
    assert got[:, 1].tolist() == [0, 0, 0, 0, 1]


def test_a_row_whose_every_column_is_banned_gets_column_zero_as_torch_does():
    logits = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    got = _check(logits, torch.tensor([1, 0]), torch.tensor([0, 1]))
    assert got[:, 0].tolist() == [0, 0]


def test_what_the_kernel_takes():
    logits = torch.zeros(2, 8)
    bans, eos = torch.zeros(2, dtype=torch.long), torch.tensor([1])
    assert gp.fits(logits, bans, eos) and gp.fits(logits.bfloat16(), bans.int(), eos)
    assert not gp.fits(logits.t(), bans, eos)  # column stride 2
    assert not gp.fits(logits, bans[:1], eos) and not gp.fits(logits, bans.float(), eos)
    assert not gp.fits(logits, bans, torch.arange(gp.MAX_EOS + 1)) and not gp.fits(logits.double(), bans, eos)
    assert gp.greedy_pick(logits[:0], bans[:0], eos).shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_gpu_the_pick_is_torchs_bit_for_bit_in_a_graph(dtype, vocab):
    """On CUDA, replayed from a CUDA graph as the decode step runs it: torch's tokens and flags at 1 and 32 rows,
    with ties, bans and non-finite rows."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for rows in (1, 32):
        logits = _logits(rows, vocab, dtype, seed=rows, device="cuda")
        logits[0, [5, 5 + gp.BLOCK]] = 50.0  # a tie across blocks
        logits[rows - 1, 2] = 60.0  # an EOS favourite, banned on the last row
        if rows > 1:
            logits[1, 9] = float("nan")
        bans = torch.zeros(rows, dtype=torch.long, device="cuda")
        bans[rows - 1] = 1
        eos = torch.tensor([2], device="cuda")
        out = torch.empty(rows, 2, dtype=torch.long, device="cuda")
        gp.greedy_pick(logits, bans, eos)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(gp.greedy_pick(logits, bans, eos))
        graph.replay()
        torch.cuda.synchronize()
        want = torch_pick(logits, bans, eos)
        finite = want[:, 1] == 1
        assert torch.equal(out[:, 1], want[:, 1]) and torch.equal(out[finite, 0], want[finite, 0])
        assert out[0, 0] == 5 and out[rows - 1, 0] != 2


@pytest.mark.sm90
def test_compiles_for_hopper_with_the_logits_read_after_the_wait(monkeypatch, tmp_path):
    """The GPU build compiles for sm_90 (bf16 and fp32 logits, one and three EOS ids), reads the logits 16 bytes a
    load (8 bf16 or 4 fp32 a thread), and under PDL reads them only after ``griddepcontrol.wait``: they are the
    lm_head's output, the kernel just before."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    gp._triton()
    kernel = triton.jit(gp._greedy_pick)
    flags = ("N_EOS", "BLOCK", "USE_PDL")
    for dtype, eos in (("bf16", 1), ("fp32", 3)):
        pointers = {"logits_ptr": f"*{dtype}", "ban_ptr": "*i64", "eos_ptr": "*i64", "out_ptr": "*i64"}
        signature = {a: "constexpr" if a in flags else pointers.get(a, "i32") for a in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"N_EOS": eos, "BLOCK": gp.BLOCK, "USE_PDL": True},
                           attrs={(kernel.arg_names.index(a),): [["tt.divisibility", 16]]
                                  for a in [*pointers, "VOCAB", "stride_row"]})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        wide = [m.start() for m in re.finditer(r"ld\.global[\w.:]*\.v4\.b32", ptx)]
        assert wide and wait < wide[0], dtype
