"""The warm-ups' judge (``step_judge``) and the int8 one-row tile it picks (``int8_linear._judge_one_row``)."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.kernels import int8_linear, step_judge
from adapterd.server.kernels.int8_configs import one_row_tiles
from adapterd.server.kernels.int8_linear import tile_name

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")


@pytest.mark.parametrize(("size_mb", "copies"),
                         [(32, 4), (90, 1), (150, 0), (180, 0), (1, 149), (0.5, 255), (0.004, 255), (2000, 0)])
def test_the_judge_reads_past_the_l2_cache_within_its_memory_and_time_bounds(size_mb, copies):
    """The judge times a candidate over the weight and copies of it: 3x an H200's 50 MB L2 in all (each call
    reads HBM, as in decode), but never more than 512 MB of copies, nor more than 255 (a test model's 4 KB
    weight: 255 calls a graph, not 131,071)."""
    size, l2 = int(size_mb * 2**20), 50 * 2**20
    assert step_judge.copies_for(size, l2) == copies
    assert copies * size <= step_judge.COPY_BYTES and copies <= step_judge.MAX_COPIES
    assert (copies + 1) * size >= 3 * l2 or copies in (step_judge.COPY_BYTES // size, step_judge.MAX_COPIES)


def _judge_with(monkeypatch, tuned: dict, us: dict[str, float | None]) -> tuple[tuple, dict]:
    """``_judge_one_row`` on a CPU 12288x4096 key whose autotuner chose ``tuned``, the judge's time of each tile
    given by ``us`` (None: that tile fails to launch). Returns the key and the chosen configs."""
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    cb, scb = torch.zeros(12288, 4096, dtype=torch.int8), torch.ones(12288)
    key = km._small_key(False, 1, x, cb, scb, None)
    chosen = {key: tuned}
    launched: list[dict] = []

    def small_m(a, w, s, b, interpret, config):  # noqa: ANN001, ANN202 (the kernel's stand-in: records the tile)
        assert a is x and w is cb and s is scb and b is None and not interpret
        launched.append(config)

    def in_step_us(a, w, runs):  # noqa: ANN001, ANN202
        (run,) = runs
        run(a, w)
        time = us[tile_name(launched[-1])]
        if time is None:
            raise RuntimeError("out of resources")
        return [time]

    monkeypatch.setattr(km, "_CHOSEN", chosen)
    monkeypatch.setattr(km, "_small_m", small_m)
    monkeypatch.setattr(step_judge, "in_step_us", in_step_us)
    monkeypatch.setattr(int8_linear, "_judged_here", lambda x: True)
    monkeypatch.setattr(int8_linear, "_ONE_ROW_JUDGED", {})
    int8_linear._judge_one_row(x, cb, scb, None)
    assert sorted(map(tile_name, launched)) == sorted(map(tile_name, one_row_tiles()))  # each tile, once
    return key, chosen


def test_the_fastest_tile_in_step_conditions_replaces_the_autotuners_pick(monkeypatch):
    """Each GEMV tile of one split is timed; the fastest is kept for the key (which the epilogues also run),
    a tile that cannot launch is no candidate, and the times are kept for the benches."""
    tiles = one_row_tiles()
    us = {tile_name(t): 50.0 + i for i, t in enumerate(tiles)}
    us[tile_name(tiles[3])] = 40.0
    us[tile_name(tiles[5])] = None  # would have been the fastest, but fails
    key, chosen = _judge_with(monkeypatch, dict(tiles[0]), us | {tile_name(tiles[5]): None})
    assert tile_name(chosen[key]) == tile_name(tiles[3])
    judged = int8_linear.one_row_judgements()[key]
    assert judged[tile_name(tiles[3])] == 40.0 and tile_name(tiles[5]) not in judged
    assert len(judged) == len(tiles) - 1


def test_the_autotuners_pick_stays_on_a_tie_or_when_every_other_tile_fails(monkeypatch):
    tiles = one_row_tiles()
    tuned = dict(tiles[2])
    key, chosen = _judge_with(monkeypatch, tuned, {tile_name(t): 30.0 for t in tiles})
    assert chosen[key] is tuned
    key, chosen = _judge_with(monkeypatch, tuned, {tile_name(t): None for t in tiles} | {tile_name(tuned): 60.0})
    assert chosen[key] is tuned


def test_a_key_is_judged_once_a_process(monkeypatch):
    """A later model load (warm_up again) does not judge the key again: it keeps what the engine's step tuning
    chose since (engine/step_tuning.py)."""
    tiles = one_row_tiles()
    us = {tile_name(t): 50.0 + i for i, t in enumerate(tiles)}
    key, chosen = _judge_with(monkeypatch, dict(tiles[4]), us)
    assert tile_name(chosen[key]) == tile_name(tiles[0])
    chosen[key] = dict(tiles[7])  # the step's choice
    monkeypatch.setattr(step_judge, "in_step_us", lambda *a: pytest.fail("judged again"))
    int8_linear._judge_one_row(torch.zeros(1, 4096, dtype=torch.bfloat16), torch.zeros(12288, 4096, dtype=torch.int8),
                               torch.ones(12288), None)
    assert tile_name(chosen[key]) == tile_name(tiles[7])


def test_keys_that_run_no_gemv_tile_are_left_to_the_autotuner(monkeypatch):
    """A tensor-core or split-K pick (K not a multiple of 4, or the autotuner's choice) is not re-judged, and
    off a CUDA device nothing is timed."""
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    cb, scb = torch.zeros(64, 4096, dtype=torch.int8), torch.ones(64)
    key = km._small_key(False, 1, x, cb, scb, None)
    split = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4}
    monkeypatch.setattr(km, "_CHOSEN", {key: split})
    monkeypatch.setattr(step_judge, "in_step_us", lambda *a: pytest.fail("timed a key with no GEMV tile"))
    monkeypatch.setattr(int8_linear, "_judged_here", lambda x: True)
    int8_linear._judge_one_row(x, cb, scb, None)
    assert km._CHOSEN[key] is split
    monkeypatch.undo()
    assert not int8_linear._judged_here(x)  # the CPU


@pytest.mark.gpu
def test_gpu_the_judged_tile_is_the_fastest_and_exact():
    """On CUDA: after tuning, every one-row tile is judged, the key runs the fastest, and the GEMV with it
    matches the fp64 product with the dequantized weight (independent of the kernel) within bf16's rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(3)
    cb = torch.randint(-127, 128, (4096, 11008), generator=g, dtype=torch.int8).cuda()
    scb = (torch.rand(4096, generator=g) * 0.2 + 0.01).cuda()
    zero = torch.zeros(1, 11008, device="cuda", dtype=torch.bfloat16)
    km.int8_weight_matmul(zero, cb, scb)  # the autotuner's pick
    int8_linear._judge_one_row(zero, cb, scb, None)
    key = km._small_key(False, 1, zero, cb, scb, None)
    judged = int8_linear.one_row_judgements()[key]
    assert set(judged) == {tile_name(t) for t in one_row_tiles()}
    assert all(0 < us < 1000 for us in judged.values())
    assert tile_name(km._CHOSEN[key]) == min(judged, key=judged.get)
    x = torch.randn(1, 11008, generator=g).to(torch.bfloat16).cuda()
    want = x.double() @ (cb.double() * scb.double()[:, None] / 127.0).T
    torch.testing.assert_close(km.int8_weight_matmul(x, cb, scb).double(), want, rtol=1e-2, atol=1e-2)
