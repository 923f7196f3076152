"""The batched LoRA layer: each row gets its own adapter's delta, computed over only the ranks in use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterd.server.adapters.lora import BatchedLoraLinear, SlotWrites
from adapterd.server.adapters.lora_slots import LoraSlotTable
from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
from adapterd.server.adapters.peft_format import LoraConfig, PrefixConfig
from adapterd.server.engine.step_context import StepContext, step_context


def forward(model: nn.Module, table: LoraSlotTable, slots: list[int], x: torch.Tensor, phase: str = "prefill"):
    """``model(x)`` as one forward of a step whose rows sit on ``slots``."""
    with step_context(StepContext(phase, table.rows_of(slots, phase))):
        return model(x)


def weights(name: str, r: int, in_f: int, out_f: int, scaling: float, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(a=torch.randn(r, in_f, generator=g), b=torch.randn(out_f, r, generator=g), scaling=scaling)
    return LoraWeights(modules={name: module}, rank=r, target_modules=[name])


# 3 slots for 3 rows: the dense path (every slot read once); 20 slots: each row's adapter gathered.
@pytest.mark.parametrize("num_slots,dense", [(3, True), (20, False)])
def test_rows_get_their_own_adapter_and_only_used_ranks_are_read(num_slots, dense):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    base = nn.Linear(12, 10)
    base.load_state_dict(model.proj.state_dict())
    table = LoraSlotTable(model, num_slots=num_slots, max_rank=32, dtype=torch.float32, device=torch.device("cpu"))
    w4, w8 = weights("proj", 4, 12, 10, 2.0, 1), weights("proj", 8, 12, 10, 0.5, 2)
    s4, s8 = table.acquire("a", w4), table.acquire("b", w8)
    x = torch.randn(3, 5, 12)
    rows = table.rows_of([s4, 0, s8], "prefill")
    assert rows.rank == 8  # the largest rank in this batch, not the table's 32
    assert (rows.onehot is not None) == dense
    out = forward(model, table, [s4, 0, s8], x)
    expected = base(x)
    for i, w in ((0, w4), (2, w8)):
        m = w.modules["proj"]
        expected[i] += (x[i] @ m.a.T @ m.b.T) * m.scaling
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[1], base(x)[1])  # a base row gets exactly the base output
    assert table.rows_of([s4, s4], "prefill").rank == 4
    assert table.rows_of([0, 0], "prefill") is None
    assert torch.equal(forward(model, table, [0, 0], x), base(x))


# ------------------------------------------------------------------ numbers that must never reach a slot table
SHAPES = {"layers.0.q_proj": (12, 10)}
KEY = "base_model.model.layers.0.q_proj.lora_{}.weight"


def _tensors(r: int = 4, a_value: float | None = None, b_value: float | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, 12, generator=g), torch.randn(10, r, generator=g)
    if a_value is not None:
        a[1, 2] = a_value
    if b_value is not None:
        b[3, 0] = b_value
    return {KEY.format("A"): a, KEY.format("B"): b}


@pytest.mark.parametrize("tensors,config,words", [
    (_tensors(b_value=float("nan")), {}, f"{KEY.format('B')} holds NaN"),
    (_tensors(a_value=float("inf")), {}, f"{KEY.format('A')} holds an infinite value"),
    (_tensors(a_value=-float("inf")), {}, f"{KEY.format('A')} holds an infinite value"),
    (_tensors(), {"lora_alpha": float("nan")}, "non-finite scaling"),
    (_tensors(), {"lora_alpha": float("inf")}, "non-finite scaling"),
    (_tensors(), {"lora_alpha": 10**400}, "non-finite scaling"),  # an int no float holds
    (_tensors(), {"lora_alpha": "8"}, "must be a number"),
    (_tensors(b_value=100.0), {"lora_alpha": 1e38},  # 100 x 2.5e37: past fp32
     f"{KEY.format('B')} times its scaling 2.5e+37 overflows float32"),
    (_tensors(r=0), {}, "rank 0"),
    ({KEY.format("A"): torch.tensor(1.0), KEY.format("B"): torch.ones(10, 4)}, {}, "not (r, in) and (out, r)"),
    (_tensors(), {"r": 8}, "rank 4 of 'layers.0.q_proj' differs from the config's 8"),  # PEFT refuses it too
    (_tensors(), {"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_non_finite_weights_and_scalings_are_refused_naming_the_tensor(tensors, config, words):
    from adapterd.server.adapters.lora_weights import parse_lora
    from adapterd.server.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition) as err:
        parse_lora(LoraConfig.from_dict({"r": 4, **config}), tensors, SHAPES, max_rank=64)
    assert words in err.value.message


def test_scaled_b_is_checked_in_the_serving_dtype():
    """fp32 weights of 1e5 are fine in fp32 and bf16, and inf in fp16 (max 65504)."""
    from adapterd.server.adapters.lora_weights import parse_lora
    from adapterd.server.errors import FailedPrecondition

    tensors = _tensors(b_value=1e5)
    for dtype in (torch.float32, torch.bfloat16):
        parse_lora(LoraConfig(r=4, lora_alpha=4), tensors, SHAPES, max_rank=64, dtype=dtype)
    with pytest.raises(FailedPrecondition) as err:
        parse_lora(LoraConfig(r=4, lora_alpha=4), tensors, SHAPES, max_rank=64, dtype=torch.float16)
    assert err.value.message == f"{KEY.format('B')} times its scaling 1 overflows float16, the serving dtype"


def test_prefix_table_is_checked_after_the_cast_to_the_serving_dtype():
    from adapterd.server.adapters.prefix import parse_prefix
    from adapterd.server.errors import FailedPrecondition

    table = torch.randn(3, 2 * 2 * 1 * 4)  # 3 virtual tokens, 2 layers x keys/values x 1 head x dim 4
    config = PrefixConfig(num_virtual_tokens=3)
    parse_prefix(config, {"prompt_embeddings": table}, 2, 1, 4).to(torch.device("cpu"), torch.float16)
    table[1, 5] = float("nan")
    with pytest.raises(FailedPrecondition, match="prompt_embeddings holds NaN"):
        parse_prefix(config, {"prompt_embeddings": table}, 2, 1, 4)
    table[1, 5] = 0.0
    table[1, 1] = 1e6  # finite in fp32, inf in fp16 (column 1: layer 0's keys)
    weights = parse_prefix(config, {"prompt_embeddings": table}, 2, 1, 4)
    with pytest.raises(FailedPrecondition, match=r"prompt_embeddings \(layer 0 keys, in float16\) holds an infinite"):
        weights.to(torch.device("cpu"), torch.float16)


def test_dense_path_keeps_an_overflowing_slot_out_of_other_rows():
    """A slot whose product overflows for a row's activations (inf in x @ A) reaches no other row: the dense
    path selects each row's slot instead of multiplying the others by zero (0 x inf = NaN)."""
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    table = LoraSlotTable(model, num_slots=3, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    s1 = table.acquire("a", weights("proj", 4, 12, 10, 1.0, 1))
    s2 = table.acquire("b", weights("proj", 4, 12, 10, 1.0, 2))
    x = torch.randn(3, 2, 12)
    assert table.rows_of([s1, 0, s1], "prefill").onehot is not None  # the dense path
    clean = forward(model, table, [s1, 0, s1], x)
    table.layers["proj"].lora_a[0, s2] = 3e38  # finite, but x @ A overflows to +-inf
    out = forward(model, table, [s1, s2, s1], x)
    assert not torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], clean[[0, 2]], rtol=0, atol=0)


def test_a_slot_write_is_its_adapters_factors_b_scaled_the_rest_zeros_and_other_slots_untouched():
    """``set_slot`` (``SlotWrites``, batched over layers): A into the first r rank rows of the slot, B stored
    times the scaling, rank rows past r zeroed, every other slot as it was; a cleared slot is all zeros."""
    layers = [BatchedLoraLinear(nn.Linear(8, 6), num_slots=3, max_rank=4, dtype=torch.float32,
                                device=torch.device("cpu")) for _ in range(2)]
    for layer in layers:
        layer.lora_a.fill_(7.0)
        layer.lora_b.fill_(7.0)
    gen = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(2, 8, generator=gen, dtype=torch.bfloat16),
                        torch.randn(6, 2, generator=gen, dtype=torch.bfloat16), 0.5)
    writes = SlotWrites()
    layers[0].plan_slot(1, module, writes)
    layers[1].plan_slot(1, None, writes)  # not targeted by this adapter
    assert layers[0].lora_a[0, 1, 0] == 7.0  # planned, not yet written
    writes.run()
    first, second = layers
    assert torch.equal(first.lora_a[:2, 1], module.a.float())
    assert torch.equal(first.lora_b[:2, 1], (module.b.t() * 0.5).float())  # scaled in B's dtype, then cast
    assert not first.lora_a[2:, 1].any() and not first.lora_b[2:, 1].any()
    assert not second.lora_a[:, 1].any() and not second.lora_b[:, 1].any()
    for layer in layers:  # slots 0 and 2 untouched
        assert (layer.lora_a[:, [0, 2]] == 7.0).all() and (layer.lora_b[:, [0, 2]] == 7.0).all()
    first.set_slot(1, None)
    assert not first.lora_a[:, 1].any() and not first.lora_b[:, 1].any()
