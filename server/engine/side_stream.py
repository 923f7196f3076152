"""Two launches of one input side by side: a LoRA shrink on a second CUDA stream beside the base matmul.

At a decode step a layer's LoRA shrink (``kernels/lora_bgmv.py``) reads only the layer's input and its rows' A
tables, as the base matmul of the same input reads only the input and the weight: neither waits for the other.
On one stream they still run one after the other, each with its launch, its ramp and its tail (at 32 rows on
32 adapters the q/k/v shrink reads 12.6 MB a layer in ~6 us of its own, bench/RESULTS.md at 89ba5f3). On a
second stream forked from the first the shrink's programs may fill the SMs and the memory bandwidth that the
matmul's leave idle (measured below: they did not pay), and the kernel that reads both (the rotary + append,
the SiLU product, the next add + norm) waits for the two.

Inside a CUDA graph capture the fork and the join are the graph's own edges: ``side.wait_stream(main)`` makes
the side stream's next launch depend on the main stream's last, ``main.wait_stream(side)`` the main stream's
next launch on the side's last (the side stream joins the capture; its allocations come from the graph's pool).
Eager steps order the two streams the same way, so the result is the same tensors either way, bit for bit:
nothing is shared but the input, which both only read.

Memory: the input stays referenced by the caller until after the join, and what the side stream allocates is
freed later on the main stream, whose next fork orders the side's reuse after it: the caching allocator never
hands the side stream a block that the main stream may still read, nor the reverse.

``SIDE_STREAM`` switches it, and it is off: ``bench/pdl_bench.py --switch side`` on the H200 (2bc60fb,
bench/RESULTS.md), every row on its own adapter, ms a decode step on / off: int8 1 row 2.682 / 2.688, 32 rows
**6.987 / 6.865**; bf16 1 row 3.989 / 3.998, 32 rows 7.482 / 7.498. Where the int8 tensor-core tiles run (32
rows) the shrink's programs beside them cost 1.8% of the step; elsewhere the gain (0.2%) is within a run's noise.
(Those "off" figures launched the shrink first; now off launches the matmul first, as before the side stream: the
shrink then follows a kernel that lets it start early under PDL, and the rotary kernel's LoRA B tiles stream while
the shrink runs, not after a matmul that triggers nothing. Not timed since: the session's device time was spent.)
Off the GPU, or switched off, the two launches run one after the other on the current stream, the matmul first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

SIDE_STREAM = False  # the shrink beside the matmul: measured no gain (above; bench/pdl_bench.py --switch side)

_streams: dict[int, torch.cuda.Stream] = {}
Side = TypeVar("Side")
Main = TypeVar("Main")


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of CUDA ``device``, made once (a graph capture forks into it, which is legal for a
    stream made before or during the capture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


def beside(x: torch.Tensor, side: Callable[[], Side], main: Callable[[], Main]) -> tuple[Side, Main]:
    """``(side(), main())``, the two calls' launches on two streams of x's device where ``SIDE_STREAM`` and x is
    on a GPU: ``side`` on the side stream, after everything launched so far on the current one; ``main`` on the
    current stream; the current stream's next launch waits for both. Elsewhere ``main()`` then ``side()``."""
    if not (SIDE_STREAM and x.is_cuda):
        main_result = main()
        return side(), main_result
    current = torch.cuda.current_stream(x.device)
    stream = side_stream(x.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        side_result = side()
    main_result = main()
    current.wait_stream(stream)
    return side_result, main_result
