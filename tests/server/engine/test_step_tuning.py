"""The int8 one-row tiles chosen by the decode step's own time (``step_tuning``): which tiles are tried, which one
stays, and that nothing is captured where the step replays no graphs. The step's time is a stand-in here (the
CPU has no graphs); the GPU runs the real one at every engine start (``gpu_decode.sh tests``, serve_bench)."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.engine import step_tuning

km = pytest.importorskip("adapterd.server.kernels.int8_matmul", reason="needs triton (the dev extra, Linux)")
from adapterd.server.kernels import int8_linear  # noqa: E402
from adapterd.server.kernels.int8_configs import one_row_tiles  # noqa: E402
from adapterd.server.kernels.int8_linear import tile_name  # noqa: E402

CPU = torch.device("cpu")
TILES = {tile_name(t): t for t in one_row_tiles()}
NAMES = list(TILES)


class Step:
    """What the tuner touches of a ``DecodeStep``: its device, whether it replays graphs, its graph cache."""

    class Graphs:
        def __init__(self) -> None:
            self.cleared = 0

        def clear(self) -> None:
            self.cleared += 1

    def __init__(self, use_graphs: bool = True) -> None:
        self.base = type("Base", (), {"device": CPU})()
        self.use_graphs = use_graphs
        self.graphs = Step.Graphs()


def _key(n: int, k: int) -> tuple:
    return (False, 1, n, k, torch.bfloat16, torch.float32, None, CPU)


def _setup(monkeypatch, chosen: dict, judged: dict) -> None:
    monkeypatch.setattr(km, "_CHOSEN", chosen)
    monkeypatch.setattr(int8_linear, "_ONE_ROW_JUDGED", judged)
    monkeypatch.setattr(step_tuning, "_TUNED", {})


def test_the_fastest_step_among_the_judges_first_tiles_keeps_its_tile(monkeypatch):
    """For each key in turn, the judge's ``CANDIDATES`` fastest tiles are tried in the step (the other keys as
    chosen so far); the fastest step's tile stays. A tile the judge ranked past them is never tried."""
    down, qkv = _key(4096, 11008), _key(12288, 4096)
    judged = {down: {NAMES[0]: 14.5, NAMES[1]: 14.6, NAMES[2]: 14.7, NAMES[3]: 20.0},
              qkv: {NAMES[4]: 16.6, NAMES[5]: 16.8, NAMES[6]: 18.0}}
    _setup(monkeypatch, {down: TILES[NAMES[0]], qkv: TILES[NAMES[4]], _key(64, 64): {"BLOCK_M": 16, "SPLIT_K": 4},
                         (False, 8, 4096, 4096, torch.bfloat16, torch.float32, None, CPU): TILES[NAMES[0]]}, judged)
    step_ms = {(NAMES[0], NAMES[4]): 2.571, (NAMES[1], NAMES[4]): 2.547, (NAMES[2], NAMES[4]): 2.560,
               (NAMES[1], NAMES[5]): 2.548, (NAMES[1], NAMES[6]): 2.600, (NAMES[3], NAMES[4]): 2.0}
    tried = []

    def timer(step) -> float:
        now = (tile_name(km._CHOSEN[down]), tile_name(km._CHOSEN[qkv]))
        tried.append(now)
        return step_ms[now]

    step = Step()
    chosen = step_tuning.tune_one_row_tiles(step, timer)
    assert chosen == {down: NAMES[1], qkv: NAMES[4]}  # qkv's alternatives were not faster by the margin
    assert km._CHOSEN[down] == TILES[NAMES[1]] and km._CHOSEN[qkv] == TILES[NAMES[4]]
    assert (NAMES[3], NAMES[4]) not in tried and len(tried) == 6  # three a key, the judge's fastest first
    assert step_tuning.step_tunings()[down] == {NAMES[0]: 2.571, NAMES[1]: 2.547, NAMES[2]: 2.560}
    assert step.graphs.cleared == 1  # the graphs captured with the candidates are dropped


def test_a_tile_within_the_noise_does_not_replace_the_current_one(monkeypatch):
    key = _key(4096, 4096)
    _setup(monkeypatch, {key: TILES[NAMES[0]]}, {key: {NAMES[0]: 7.2, NAMES[1]: 7.3}})
    times = {NAMES[0]: 2.560, NAMES[1]: 2.559}  # 0.04% faster: under MARGIN
    chosen = step_tuning.tune_one_row_tiles(Step(), lambda step: times[tile_name(km._CHOSEN[key])])
    assert chosen == {key: NAMES[0]} and km._CHOSEN[key] == TILES[NAMES[0]]


def test_a_failing_step_leaves_the_judges_tiles(monkeypatch):
    key = _key(4096, 4096)
    _setup(monkeypatch, {key: TILES[NAMES[0]]}, {key: {NAMES[1]: 7.2, NAMES[0]: 7.3}})

    def timer(step) -> float:
        if km._CHOSEN[key] != TILES[NAMES[0]]:
            raise RuntimeError("capture failed")
        return 2.5

    step = Step()
    assert step_tuning.tune_one_row_tiles(step, timer) == {}
    assert km._CHOSEN[key] == TILES[NAMES[0]] and step.graphs.cleared == 1


def test_nothing_is_timed_without_graphs(monkeypatch):
    """On the CPU, or with graphs off, the real timer is never called (it would capture a graph)."""
    key = _key(4096, 4096)
    _setup(monkeypatch, {key: TILES[NAMES[0]]}, {key: {NAMES[1]: 7.2}})
    monkeypatch.setattr(step_tuning, "graph_step_ms", lambda step: pytest.fail("timed"))
    assert step_tuning.tune_one_row_tiles(Step(use_graphs=False)) == {}
    assert km._CHOSEN[key] == TILES[NAMES[0]]


def test_a_key_is_tuned_once_a_process(monkeypatch):
    """A second engine in the process (a test, a bench) keeps the tile the first chose: nothing is timed again."""
    key = _key(4096, 4096)
    _setup(monkeypatch, {key: TILES[NAMES[0]]}, {key: {NAMES[1]: 7.2, NAMES[0]: 7.3}})
    times = {NAMES[0]: 2.56, NAMES[1]: 2.50}
    assert step_tuning.tune_one_row_tiles(Step(), lambda step: times[tile_name(km._CHOSEN[key])]) == {key: NAMES[1]}
    assert step_tuning.tune_one_row_tiles(Step(), lambda step: pytest.fail("timed again")) == {}
    assert km._CHOSEN[key] == TILES[NAMES[1]]


def test_the_model_device_named_with_or_without_its_index_is_the_keys():
    """A base loaded on ``cuda`` and kernels keyed by ``cuda:0`` (the current device) are one device."""
    assert step_tuning._same_device(torch.device("cpu"), CPU)
    assert not step_tuning._same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert step_tuning._same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not step_tuning._same_device(torch.device("cuda", 1), torch.device("cuda", 0))
