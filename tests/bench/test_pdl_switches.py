"""bench/pdl_switches.py: every switch that pdl_bench turns on or off is put back as it was, so that a run of
several switches measures each against the server's defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "bench"))

import pdl_switches  # noqa: E402
from pdl_switches import SWITCHES, Context, restore, snapshot  # noqa: E402


def state() -> dict[str, object]:
    """Every module attribute, class method and environment variable a switch may set, as it is now."""
    m = pdl_switches._modules()
    names = ["decoder.NORM_FOLD_MIN_ROWS", "side_stream.SIDE_STREAM", "int8_matmul.REDUCE_PDL",
             "int8_shrink.IN_MATMUL", "dense_splitk.IN_DECODE", "lora_folds.O_PROJ_IN_MATMUL",
             "int8_expand.IN_MATMUL", "int8_expand.FLOAT_IN_MATMUL", "FusedLinear.rope_append",
             "FusedLinear.silu_glu"]
    seen = {name: vars(m[name.split(".")[0]])[name.split(".")[1]] for name in names}
    seen["ADAPTERD_PDL"] = os.environ.get("ADAPTERD_PDL")
    seen["dense_gemv._CHOSEN"] = dict(m["dense_gemv"]._CHOSEN)
    return seen


@pytest.fixture
def judged_shape(monkeypatch):
    """A float shape as the GEMV's warm-up would have judged it (no warm-up judges one on the CPU)."""
    m = pdl_switches._modules()["dense_gemv"]
    shape = (64, 32, "float16", None, "cuda")
    monkeypatch.setitem(m._JUDGED, shape, (3.0, 4.0, {"BLOCK": 1}))
    monkeypatch.setitem(m._CHOSEN, shape, {"BLOCK": 1})
    return shape


@pytest.mark.parametrize("name", list(SWITCHES))
@pytest.mark.parametrize("on", [True, False])
def test_a_switch_changes_what_it_holds_and_restore_puts_it_back(monkeypatch, judged_shape, name, on):
    monkeypatch.delenv("ADAPTERD_PDL", raising=False)
    switch = SWITCHES[name]
    ctx = Context(decoder=SimpleNamespace(forward=object()), rows=4, shape=judged_shape)  # a forward with no
    before = state()                                                                      # split-K weights to tune
    saved = snapshot(switch, ctx)
    switch.apply(on, ctx)
    during = state()
    restore(saved)
    assert state() == before
    changed = {key for key in before if before[key] != during[key]}
    held = {f"{getattr(owner, '__name__', '').rsplit('.', 1)[-1]}.{key}" for owner, key in switch.held(ctx)}
    # what changed is held (else a later switch would be measured against it); a switch that sets nothing
    # either way would measure nothing: each one changes something one way or the other
    for key in changed:
        assert key in ("ADAPTERD_PDL", "dense_gemv._CHOSEN") or key in held, (name, key, held)
    if not changed:
        switch.apply(not on, ctx)
        changed = {key for key, value in state().items() if before[key] != value}
        restore(saved)
        assert changed and state() == before, name


def test_names_are_parsed_in_order_once_each():
    assert [s.name for s in pdl_switches.parse("expand, shrink,expand")] == ["expand", "shrink"]
    with pytest.raises(ValueError, match="unknown switch expnd"):
        pdl_switches.parse("shrink,expnd")
    with pytest.raises(ValueError, match="unknown switch"):
        pdl_switches.parse(",")
