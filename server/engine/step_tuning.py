"""The int8 GEMV's one-row tiles chosen inside the decode step itself, at start-up (issue 18).

At one row each int8 weight shape runs one GEMV tile (``kernels/int8_matmul.py``; the q/k/v and gate/up
epilogues run it too). Its autotuner times each tile alone after an L2 flush, and the warm-up's judge then times
each after an RMSNorm in a CUDA graph (``kernels/step_judge.py``). Neither sees the step itself: the kernel
before each matmul (the attention's merge before o_proj, the gate/up GEMV before down_proj) shares the SMs with
its first tiles under PDL, and the next one's weight stream overlaps its last. On the H200 at e18cce3 and fb55dbe
(bench/tile_bench.py), the judge's pick for Llama-2-7B's 4096x11008 was 0.022-0.025 ms a one-row int8 step
behind the step's best tile, which the judge ranked second; its picks for 12288x4096 and 22016x4096 were the
step's best.

So once the decode step exists, ``tune_one_row_tiles`` replays it: for each one-row int8 key in turn (the others
as chosen so far), each of the judge's ``CANDIDATES`` fastest tiles is set for that key, the one-row decode
graph is captured afresh at ``LENGTH`` entries and replayed ``REPLAYS`` times, and the fastest step keeps its
tile (the current one unless another is ``MARGIN`` faster). Cost: one capture and ~60 ms of replays a
candidate, ~3 a key; new tiles of the epilogues compile the first time (Triton caches them on disk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decode_step import DecodeStep

log = logging.getLogger(__name__)

CANDIDATES = 3  # the judge's fastest tiles tried in the step, a key (the step's best was among its first two)
LENGTH = 512  # key/value entries of the row the step is timed at (serve_bench's context)
REPLAYS = 20  # replays timed a candidate, after 3 untimed
MARGIN = 0.002  # another tile replaces the current one only if the step is this share faster (noise: ~0.1%)

# One-row key -> {tile name: ms a step with it}, for every key tuned in the step (the benches print them)
_TUNED: dict[tuple, dict[str, float]] = {}


def one_row_keys(device: torch.device) -> list[tuple]:
    """The compiled int8 kernel's one-row keys on ``device`` that run a GEMV tile of one split."""
    from ..kernels.int8_matmul import _CHOSEN

    return [key for key, config in _CHOSEN.items()
            if not key[0] and key[1] == 1 and _same_device(key[-1], device) and config["BLOCK_M"] == 1
            and config["SPLIT_K"] == 1]


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (``cuda`` and ``cuda:0`` are, where 0 is the current device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def tune_one_row_tiles(step: DecodeStep, timer: Callable[[DecodeStep], float] | None = None) -> dict[tuple, str]:
    """Choose each one-row int8 key's GEMV tile by the decode step's own time (see the module's docstring),
    once a process (a key tuned by an earlier engine keeps its tile); nothing where the step replays no CUDA
    graphs or no int8 GEMV runs. ``timer``: ms a step of ``step`` as it
    stands (``graph_step_ms``; tests give their own). Returns key -> the chosen tile's name; drops the graphs
    it captured."""
    from ..kernels.int8_configs import one_row_tiles
    from ..kernels.int8_linear import one_row_judgements, tile_name
    from ..kernels.int8_matmul import _CHOSEN

    timer = timer or graph_step_ms
    keys = one_row_keys(step.base.device) if step.use_graphs or timer is not graph_step_ms else []
    keys = [key for key in keys if key not in _TUNED]  # once a process (the choice stays in _CHOSEN)
    tiles = {tile_name(t): t for t in one_row_tiles()}
    judged = one_row_judgements()
    chosen: dict[tuple, str] = {}
    try:
        for key in keys:
            current = _CHOSEN[key]
            order = sorted(judged.get(key, {}), key=judged.get(key, {}).get)
            try:
                times = _step_times(step, key, timer, [tiles[n] for n in order if n in tiles][:CANDIDATES])
            except Exception as exc:  # noqa: BLE001 (a capture or launch that fails: serve with the judge's tiles)
                _CHOSEN[key] = current
                log.warning("int8 one-row tiles not tuned in the decode step (%s): the warm-up judge's stay", exc)
                break
            best = min(times, key=times.get)
            keep = times[best] < times[tile_name(current)] * (1 - MARGIN)
            _CHOSEN[key] = tiles[best] if keep else current
            chosen[key] = tile_name(_CHOSEN[key])
            _TUNED[key] = times
            log.info("int8 one-row tile for %dx%d chosen in the decode step: %s (ms a step: %s)", key[2], key[3],
                     chosen[key], ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(times.items(), key=lambda i: i[1])))
    finally:
        step.graphs.clear()
    return chosen


def _step_times(step: DecodeStep, key: tuple, timer: Callable[[DecodeStep], float],
                candidates: list[dict]) -> dict[str, float]:
    """{tile name: ms a step} for ``key``'s current tile and each of ``candidates`` set for it in turn (the last
    one timed stays set: the caller chooses)."""
    from ..kernels.int8_linear import tile_name
    from ..kernels.int8_matmul import _CHOSEN

    times = {tile_name(_CHOSEN[key]): timer(step)}
    for tile in candidates:
        if tile_name(tile) not in times:
            _CHOSEN[key] = tile
            times[tile_name(tile)] = timer(step)
    return times


def step_tunings() -> dict[tuple, dict[str, float]]:
    """``tune_one_row_tiles``' measurements so far: one-row key -> {tile name: ms a step}."""
    return {key: dict(times) for key, times in _TUNED.items()}


def graph_step_ms(step: DecodeStep) -> float:
    """Milliseconds a one-row decode step of ``step`` takes as tiles stand now: its graph captured afresh for a
    row at ``LENGTH`` entries, replayed ``REPLAYS`` times after 3 (CUDA events: device time only)."""
    from ..kernels.support import replay_ms
    from .decode_step import batch_bucket, length_bucket

    step.graphs.clear()  # the tiles are baked into a captured graph
    length = min(LENGTH, step.pool.max_capacity - 1)
    step.run([step.base.pad_token_id], [length], [length], [0])
    entry = step.graphs.entry((batch_bucket(1, step.max_batch), length_bucket(length + 1, step.pool.max_capacity), 0))
    if entry is None:
        raise RuntimeError("the one-row decode step was not captured")
    return replay_ms(entry[0], REPLAYS, untimed=3)
