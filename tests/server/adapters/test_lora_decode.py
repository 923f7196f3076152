"""The LoRA shrink launched early (``adapters/lora_decode.py``): before the base matmul, on a side stream on a
GPU. Its partials must be the ones the shrink-after-matmul order computes, bit for bit, eagerly and replayed
from a CUDA graph whose capture forks to the side stream and joins again."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.adapters.lora_decode import launch_shrink

triton = pytest.importorskip("triton")
kb = pytest.importorskip("adapterd.server.kernels.lora_bgmv")


def _group(widths: tuple[int, ...], in_f: int, r: int, s: int, dtype: torch.dtype, device: str, seed: int = 0):
    """G members' tables as a LoraGroup keeps them (A stacked ``[G, r, s, in]``, one B a member), slot 0 zeros."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(len(widths), r, s, in_f, generator=g) * 0.05
    bs = [torch.randn(r, s, w, generator=g) * 0.05 for w in widths]
    a[:, :, 0] = 0
    for b in bs:
        b[:, 0] = 0
    return a.to(device, dtype), [b.to(device, dtype) for b in bs]


def test_early_shrink_gives_the_grouped_launchs_bits(monkeypatch):
    """On the CPU (Triton's interpreter): the early shrink, then the base "matmul", then the expand, give each
    member the bits of ``lora_group_delta_`` after the matmul; a row on slot 0 stays as it was."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    widths = (48, 16, 16)
    a, bs = _group(widths, 64, 8, 4, torch.float32, "cpu")
    x = torch.randn(3, 64)
    slots = torch.tensor([2, 0, 3])
    early = launch_shrink(x, a, slots, 6)
    assert early.stream is None
    ys = [torch.randn(3, w) for w in widths]
    before = [y.clone() for y in ys]
    want = [y.clone() for y in ys]
    early.expand_(ys, bs, slots, 6)
    kb.lora_group_delta_(want, x, a, bs, slots, 6)
    for y, w, b in zip(ys, want, before, strict=True):
        assert torch.equal(y, w)
        assert torch.equal(y[1], b[1]) and not torch.equal(y[0], b[0])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_side_stream_in_a_cuda_graph_beside_the_base_matmul(rows):
    """Llama-2-7B's q, k, v at rank 16, bf16, 33 slots: the shrink on the side stream while a 4096x12288 matmul
    runs on the main one, captured in a CUDA graph and replayed on new inputs, gives the bits of the grouped
    launch after the matmul, eagerly and from the graph; the main stream's later work sees the joined result."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    widths = (4096, 4096, 4096)
    a, bs = _group(widths, 4096, 64, 33, torch.bfloat16, "cuda", seed=rows)
    weight = torch.randn(sum(widths), 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    slots = torch.randint(1, 33, (rows,), device="cuda")

    def step() -> list[torch.Tensor]:
        early = launch_shrink(x, a, slots, 16)
        ys = list((x @ weight.T).split(widths, 1))  # the base matmul, beside the shrink
        early.expand_(ys, bs, slots, 16)
        return [y * 1 for y in ys]  # a later kernel on the main stream

    def after() -> list[torch.Tensor]:
        ys = list((x @ weight.T).split(widths, 1))
        kb.lora_group_delta_(ys, x, a, bs, slots, 16)
        return ys

    eager, want = step(), after()  # also the warm-up: compiles
    for y, w in zip(eager, want, strict=True):
        assert torch.equal(y, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    slots.copy_(torch.randint(0, 33, slots.shape, device="cuda"))  # slot 0 rows among them
    graph.replay()
    torch.cuda.synchronize()
    for y, w in zip(out, after(), strict=True):
        assert torch.equal(y, w)
