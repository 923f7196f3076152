"""What ``pdl_bench.py --switch`` turns on and off: one entry a switch, in a registry (``SWITCHES``).

Each switch sets the server's module attributes (or ``ADAPTERD_PDL``) that the decoder and the kernels read at
each forward or launch; ``pdl_bench`` then captures every decode graph afresh each way. ``held`` names what a
switch sets, so that the bench puts every one of them back after each measurement: a run of several switches
measures each against the server's defaults, never against the one before it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Context:
    """What a switch may need to set itself: the engine's decoder, the measured rows and (``gemv``) the float
    weight shape judged."""

    decoder: Any
    rows: int
    shape: tuple | None = None


@dataclass(frozen=True)
class Switch:
    name: str
    what: str  # the record's words for "on", as "PDL"
    apply: Callable[[bool, Context], None]  # set on or off; runs on the engine's thread
    # what it sets, (module, class or mapping; name or key) pairs: put back after each measurement
    held: Callable[[Context], list[tuple[Any, Any]]]
    every_row_lora: bool = False  # base rows have nothing to switch: every row of each --rows batch on its adapter
    per_shape: bool = False  # measured once for each float shape the GEMV's warm-up judged


def _modules() -> dict[str, Any]:
    from adapterd.server.adapters import lora_folds
    from adapterd.server.engine import decoder, side_stream
    from adapterd.server.engine.fused_projections import FusedLinear
    from adapterd.server.kernels import dense_gemv, dense_splitk, int8_expand, int8_matmul, int8_shrink

    return dict(lora_folds=lora_folds, decoder=decoder, side_stream=side_stream, FusedLinear=FusedLinear,
                dense_gemv=dense_gemv, dense_splitk=dense_splitk, int8_expand=int8_expand, int8_matmul=int8_matmul,
                int8_shrink=int8_shrink)


def _attrs(*names: str) -> Callable[[Context], list[tuple[Any, Any]]]:
    """``held`` for module attributes named "module.ATTR" (keys of ``_modules``)."""
    def held(ctx: Context) -> list[tuple[Any, Any]]:
        modules = _modules()
        return [(modules[name.split(".")[0]], name.split(".")[1]) for name in names]
    return held


def _pdl(on: bool, ctx: Context) -> None:  # the kernels read ADAPTERD_PDL at each launch
    os.environ["ADAPTERD_PDL"] = "1" if on else "0"


_EPILOGUES = ("rope_append", "silu_glu")  # FusedLinear's one-row epilogue methods


def _epilogues(on: bool, ctx: Context) -> None:  # off: each returns None, and the decoder runs the two steps
    if not on:
        for name in _EPILOGUES:
            setattr(_modules()["FusedLinear"], name, lambda *a, **k: None)


def _gemv(on: bool, ctx: Context) -> None:  # on: the GEMV kernel for ctx.shape, off: F.linear; others as judged
    _modules()["dense_gemv"].choose(ctx.shape, on)


def _fold(on: bool, ctx: Context) -> None:  # read at each forward (each capture)
    _modules()["decoder"].NORM_FOLD_MIN_ROWS = 1 if on else sys.maxsize


def _side(on: bool, ctx: Context) -> None:
    _modules()["side_stream"].SIDE_STREAM = on


def _reduce(on: bool, ctx: Context) -> None:  # read at each launch
    _modules()["int8_matmul"].REDUCE_PDL = on


def _shrink(on: bool, ctx: Context) -> None:
    _modules()["int8_shrink"].IN_MATMUL = on


def _split_k(on: bool, ctx: Context, o_proj: bool) -> None:
    """A float base's fused matmuls through the split-K kernel, the row bucket tuned first (the engine's own
    decoder only: transformers' forward has none to tune); ``o_proj``: every shrink in its matmul's launch both
    ways, o_proj's own there when on."""
    m = _modules()
    split_k = on or o_proj
    forward = ctx.decoder.forward
    if split_k and hasattr(forward, "splitk_weights"):
        m["dense_splitk"].warm_up(forward.splitk_weights(), [m["int8_matmul"].row_bucket(ctx.rows)])
    m["dense_splitk"].IN_DECODE = m["int8_shrink"].IN_MATMUL = split_k
    m["lora_folds"].O_PROJ_IN_MATMUL = on and o_proj


_SPLIT_K_HELD = _attrs("dense_splitk.IN_DECODE", "int8_shrink.IN_MATMUL", "lora_folds.O_PROJ_IN_MATMUL")


def _expand(on: bool, ctx: Context) -> None:  # an int8 o_proj's and a float one's
    m = _modules()
    m["int8_expand"].IN_MATMUL = m["int8_expand"].FLOAT_IN_MATMUL = on


SWITCHES: dict[str, Switch] = {s.name: s for s in (
    Switch("pdl", "PDL", _pdl, lambda ctx: [(os.environ, "ADAPTERD_PDL")]),
    Switch("epilogues", "the one-row GEMV epilogues", _epilogues,
           lambda ctx: [(_modules()["FusedLinear"], name) for name in _EPILOGUES]),
    Switch("gemv", "the float GEMV kernel (against F.linear) for the shape named", _gemv,
           lambda ctx: [(_modules()["dense_gemv"]._CHOSEN, ctx.shape)], per_shape=True),  # the judge's verdict
    Switch("fold", "o_proj's LoRA expand folded into the add + norm", _fold, _attrs("decoder.NORM_FOLD_MIN_ROWS"),
           every_row_lora=True),
    Switch("side", "the LoRA shrinks on a second stream beside the base matmuls", _side,
           _attrs("side_stream.SIDE_STREAM"), every_row_lora=True),
    Switch("reduce", "the int8 split-K reduction with PDL past PDL_MAX_BUCKET", _reduce,
           _attrs("int8_matmul.REDUCE_PDL")),
    Switch("shrink", "the LoRA shrinks as extra programs of their int8 matmuls' launches", _shrink,
           _attrs("int8_shrink.IN_MATMUL"), every_row_lora=True),
    Switch("dense", "the float fused matmuls in the split-K kernel, their LoRA shrinks in its launch",
           lambda on, ctx: _split_k(on, ctx, o_proj=False),
           _SPLIT_K_HELD),
    Switch("oproj", "o_proj's LoRA shrink in its matmul's launch (not the attention merge's)",
           lambda on, ctx: _split_k(on, ctx, o_proj=True),
           _SPLIT_K_HELD,
           every_row_lora=True),
    Switch("expand", "o_proj's LoRA delta's sums in its matmul's launch (not the add + norm's fold)", _expand,
           _attrs("int8_expand.IN_MATMUL", "int8_expand.FLOAT_IN_MATMUL"), every_row_lora=True),
)}


def parse(text: str) -> list[Switch]:
    """``--switch``'s value: one name or several, comma-separated, each measured in turn in one process."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SWITCHES]
    if unknown or not names:
        raise ValueError(f"unknown switch {', '.join(unknown) or repr(text)}: choose from {', '.join(SWITCHES)}")
    return [SWITCHES[name] for name in dict.fromkeys(names)]


_ABSENT = object()


def snapshot(switch: Switch, ctx: Context) -> list[tuple[Any, Any, Any]]:
    """What ``switch`` sets, as it is now (``restore`` puts it back)."""
    return [(owner, name, (owner if isinstance(owner, MutableMapping) else vars(owner)).get(name, _ABSENT))
            for owner, name in switch.held(ctx)]


def restore(saved: list[tuple[Any, Any, Any]]) -> None:
    for owner, name, value in saved:
        if isinstance(owner, MutableMapping):
            if value is _ABSENT:
                owner.pop(name, None)
            else:
                owner[name] = value
        elif value is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
