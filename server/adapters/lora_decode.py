"""A decode step's LoRA shrink launched early: before the base matmul of the layers it serves, and on a GPU on a
side stream, so that it runs beside that matmul instead of after it.

On the BGMV path (``kernels/lora_bgmv.py``) a layer's delta is two launches after its base matmul: the shrink
(``x @ A^T`` a row, split along K) and the expand (``@ B``, added into the base output). The shrink reads only
x, the A tables and the rows' slots, none of which the base matmul writes, so the engine's own decoder
(``engine/decoder.py``, through ``lora.early_shrink``) starts it first. On CUDA it is queued on a side stream
that waits for x, and the main stream waits for the side stream again before the expand (``EarlyShrink.join``);
CUDA graph capture records the two as branches of the step's graph. The side stream's shrink launches without
PDL (its predecessor is an event, not a kernel of its stream), and so does the expand after the join (it has
two predecessors). At 32 rows on 32 adapters the base matmul reads its weight at about half of the H200's
bandwidth (bench/NOTES.md), and the shrink's reads of A (half of the LoRA bytes at q, k, v and o) fill some of
the rest.

The partials are allocated on the main stream before the fork and read there after the join, so the caching
allocator never hands their block to other work while the side stream writes it; x, the tables and the slots
outlive the join. On the CPU (Triton's interpreter, the tests) the same launches run in the same order on the
one stream. Either way the sums are the shrink-after-matmul order's, bit for bit (the kernels' own tests and
the parity suite check it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class EarlyShrink:
    """The partials of one shrink launched early (``lora_bgmv.lora_shrink``): ``[G, splits, rows, BLOCK_R]``
    fp32 for the G members whose A tables ``lora_a`` ([G, R, slots, in]) it read; ``stream``: the side stream it
    runs on (None: the current one)."""

    partials: torch.Tensor
    lora_a: torch.Tensor
    stream: torch.cuda.Stream | None

    def join(self) -> None:
        """Make the current stream wait for the shrink (nothing to wait for on one stream)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.partials.device).wait_stream(self.stream)

    def expand_(self, ys: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], slots: torch.Tensor,
                rank: int) -> None:
        """``ys[g] += `` member g's delta (rows ``[rows, out]``, in place), once the shrink is joined."""
        from ..kernels import lora_bgmv

        self.join()
        lora_bgmv.lora_expand_(ys, self.partials, lora_bs, slots, rank, pdl=self.stream is None)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream a device, kept for the process (a captured graph records its work as a branch)."""
    return torch.cuda.Stream(device)


def launch_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, rank: int) -> EarlyShrink:
    """Launch the shrink of x (``[rows, in]``) for the members whose A tables are ``lora_a`` ([G, R, slots,
    in]): on CUDA on the side stream, after everything the current stream has queued (x among it)."""
    from ..kernels import lora_bgmv

    if x.device.type != "cuda":
        return EarlyShrink(lora_bgmv.lora_shrink(x, lora_a, slots, rank), lora_a, None)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(torch.device("cuda", main.device_index))
    partials = lora_bgmv.new_partials(x, lora_a, rank)  # on main: the side stream only writes it before the join
    side.wait_stream(main)
    with torch.cuda.stream(side):
        lora_bgmv.lora_shrink(x, lora_a, slots, rank, pdl=False, out=partials)  # its predecessor: an event
    return EarlyShrink(partials, lora_a, side)
