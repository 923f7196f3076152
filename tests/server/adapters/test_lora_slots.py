"""The LoRA slot table: one host-to-device copy per adapter fill, and the decode kernel chosen once for the
device, each step's rows routed by its phase."""

from __future__ import annotations

import torch
from torch import nn

from adapterd.server.adapters.lora_slots import LoraSlotTable
from adapterd.server.adapters.lora_weights import LoraModule
from tests.server.adapters.test_lora import forward, weights


def test_stage_on_keeps_every_view_of_a_shared_buffer():
    from adapterd.server.adapters.lora_slots import stage_on
    from adapterd.server.adapters.store import pack_host

    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), torch.randn(2, 6, generator=g),
           torch.randn(6, 2, generator=g)]
    packed = pack_host(raw, torch.float32, pin=False)
    modules = {"x": LoraModule(packed[0], packed[1], 1.0), "y": LoraModule(packed[2], packed[3], 0.5)}
    staged = stage_on(torch.device("meta"), modules)  # a device of its own; views keep their shapes
    assert {n: (m.a.shape, m.b.shape, m.scaling) for n, m in staged.items()} == {
        n: (m.a.shape, m.b.shape, m.scaling) for n, m in modules.items()}
    # each staged view starts where its host tensor starts in the shared buffer (one copy, offsets kept)
    assert [(m.a.storage_offset(), m.b.storage_offset()) for m in staged.values()] == [
        (m.a.storage_offset(), m.b.storage_offset()) for m in modules.values()]


def _spy_kernel(monkeypatch, available: bool = True) -> tuple[list, list]:
    """A stand-in decode kernel adding the torch reference in place (the kernels' own tests are in
    tests/server/kernels), and availability answering ``available``: (kernel calls, devices asked)."""
    import types

    import adapterd.server.adapters.lora as lora

    calls, asked = [], []

    def fake_delta(y, x, a, b, slots, rank):
        calls.append((tuple(y.shape), tuple(x.shape), rank))
        xa = torch.einsum("mk,rmk->mr", x, a[:rank].index_select(1, slots))
        y += torch.einsum("mr,rmn->mn", xa, b[:rank].index_select(1, slots))

    # what ``from ..kernels import lora_bgmv`` finds (the real module needs Triton)
    monkeypatch.setattr("adapterd.server.kernels.lora_bgmv", types.SimpleNamespace(lora_delta_=fake_delta),
                        raising=False)
    monkeypatch.setattr(lora, "lora_kernel_available", lambda d: asked.append(d) or available)
    return calls, asked


def _two_adapter_table(num_slots: int = 4, **kw) -> tuple[nn.Module, LoraSlotTable, int, int]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    table = LoraSlotTable(model, num_slots=num_slots, max_rank=16, dtype=torch.float32,
                          device=torch.device("cpu"), **kw)
    return model, table, table.acquire("a", weights("proj", 4, 12, 10, 2.0, 1)), table.acquire(
        "b", weights("proj", 8, 12, 10, 0.5, 2))


def test_decode_steps_go_to_the_kernel_and_prefills_to_the_torch_paths(monkeypatch):
    """The step says which phase it is: the same one-token rows go to the kernel in a decode step and to the
    torch path in a prefill (a one-token prompt), with the same result; a decode step of more rows than the
    kernel serves, or with autograd on, keeps the torch paths."""
    calls, _ = _spy_kernel(monkeypatch)
    model, table, s1, s2 = _two_adapter_table()
    x = torch.randn(3, 1, 12)
    with torch.no_grad():
        decoded = forward(model, table, [s1, 0, s2], x, "decode")
        assert calls == [((3, 10), (3, 12), 8)]
        prefilled = forward(model, table, [s1, 0, s2], x, "prefill")
        forward(model, table, [s1, 0, s2], torch.randn(3, 5, 12), "prefill")
        assert len(calls) == 1
        torch.testing.assert_close(decoded, prefilled)  # the torch path gives the same
        forward(model, table, [s1, s2], torch.randn(2, 12), "decode")  # [rows, in] is a decode step too
        assert len(calls) == 2
        forward(model, table, [s1] * 65, torch.randn(65, 1, 12), "decode")  # more rows than the kernel's
        assert len(calls) == 2
    forward(model, table, [s1, s2], torch.randn(2, 1, 12), "decode")  # autograd on: y is tracked
    assert len(calls) == 2


def test_the_kernel_is_chosen_once_when_the_table_is_built(monkeypatch):
    """Availability is asked once, for the table's device, when the table is built; forwards ask nothing.
    Where the kernels do not run, or the engine opts out (--no-fused-kernels), every step keeps the torch
    paths."""
    calls, asked = _spy_kernel(monkeypatch)
    model, table, s1, s2 = _two_adapter_table()
    assert asked == [torch.device("cpu")] and table.decode_kernel is not None
    with torch.no_grad():
        for _ in range(3):
            forward(model, table, [s1, s2], torch.randn(2, 1, 12), "decode")
    assert len(calls) == 3 and len(asked) == 1
    _, off, s1, s2 = _two_adapter_table(use_kernel=False)
    assert len(asked) == 1 and off.decode_kernel is None  # opted out: not even asked
    assert off.rows_of([s1, s2], "decode").kernel is None
    calls, asked = _spy_kernel(monkeypatch, available=False)
    model, table, s1, s2 = _two_adapter_table()
    assert asked == [torch.device("cpu")] and table.decode_kernel is None
    with torch.no_grad():
        forward(model, table, [s1, s2], torch.randn(2, 1, 12), "decode")
    assert calls == []
