"""The step context: each forward's LoRA rows and key/value view are the step's own, never left behind in a
shared field; prefill and decode steps tell the LoRA layers which they are."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn

from adapterd.server.adapters.lora_slots import LoraSlotTable
from adapterd.server.adapters.lora_weights import LoraModule, LoraWeights
from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.engine.step_context import StepContext, current_step, step_context
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import run_together


def _wrapped() -> tuple[nn.Module, LoraSlotTable, int]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 5))
    table = LoraSlotTable(model, num_slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    module = LoraModule(a=torch.randn(4, 6), b=torch.randn(5, 4), scaling=1.0)
    return model, table, table.acquire("a", LoraWeights(modules={"proj": module}, rank=4, target_modules=["proj"]))


def test_a_forward_outside_any_step_fails_instead_of_reading_the_last_steps_rows():
    model, table, slot = _wrapped()
    x = torch.randn(2, 3, 6)
    with step_context(StepContext("prefill", table.rows_of([slot, slot], "prefill"))):
        inside = model(x)
    assert not torch.equal(inside, model.proj.base_layer(x))  # the adapter was applied
    with pytest.raises(RuntimeError, match="outside any engine step"):
        model(x)
    with step_context(StepContext("prefill")):  # a step without LoRA rows: the base output, exactly
        assert torch.equal(model(x), model.proj.base_layer(x))


def test_contexts_nest_and_each_thread_sees_its_own():
    outer, inner = StepContext("prefill"), StepContext("decode")
    seen = []
    with step_context(outer):
        with step_context(inner):
            assert current_step() is inner
            thread = threading.Thread(target=lambda: seen.append(_current_or_none()))
            thread.start()
            thread.join()
        assert current_step() is outer
    assert seen == [None]  # another thread (say, the gRPC loop) never sees the engine thread's step
    assert _current_or_none() is None


def _current_or_none() -> StepContext | None:
    try:
        return current_step()
    except RuntimeError:
        return None


def test_views_of_the_pool_are_the_steps_own():
    """The pool is storage only; a forward reads and writes through the view its step built (a transformers
    Cache), so two views never share a field."""
    from transformers.cache_utils import Cache

    from adapterd.server.engine.kv_pool import KvPool

    pool = KvPool(1, 1, 2, torch.float32, torch.device("cpu"), max_rows=4, max_capacity=8, rows=2, capacity=4)
    assert not isinstance(pool, Cache)  # it cannot be handed to a model as a cache
    decode = pool.decode_view(2, 3, torch.tensor([1, 2]))
    prefill = pool.prefill_view(torch.tensor([0]), torch.tensor([[0, 1, 2]]), prefix=0)
    assert isinstance(decode, Cache) and isinstance(prefill, Cache)
    assert (decode.get_seq_length(), prefill.get_seq_length()) == (3, 0)
    keys, _ = decode.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
    assert keys.shape == (2, 1, 3, 2)  # the decode view is unchanged by the prefill view built after it


def test_engine_decode_steps_use_the_kernel_and_prefills_the_torch_paths(tiny_model_dir, adapter_root,
                                                                         monkeypatch):
    """With a kernel available (here a stand-in adding the torch reference in place), the engine's decode
    steps hand LoRA rows to it and its prefills keep the torch paths, as each step says; mixed rows keep
    PEFT's tokens alone."""
    import types

    import adapterd.server.adapters.lora as lora
    from adapterd.server.engine import decoder
    from adapterd.server.model import load_base_model

    phases = []

    def spy_delta(y, x, a, b, slots, rank):
        phases.append(current_step().phase)
        xa = torch.einsum("mk,rmk->mr", x, a[:rank].index_select(1, slots))
        y += torch.einsum("mr,rmn->mn", xa, b[:rank].index_select(1, slots))

    def spy_group(ys, x, a, bs, slots, rank):  # q, k and v as one group (the own decoder's)
        for y, a_g, b in zip(ys, a, bs, strict=True):
            spy_delta(y, x, a_g, b, slots, rank)

    monkeypatch.setattr("adapterd.server.kernels.lora_bgmv",
                        types.SimpleNamespace(lora_delta_=spy_delta, lora_group_delta_=spy_group), raising=False)
    monkeypatch.setattr(lora, "lora_kernel_available", lambda device: True)
    # the stand-in has no shrink and expand halves, which the folds of o_proj's and down_proj's deltas into the
    # add + norms after them call (tests/server/adapters/test_lora_group.py): this test keeps them off
    monkeypatch.setattr(decoder, "NORM_FOLD_MIN_ROWS", sys.maxsize)
    routed = []  # (phase, kernel chosen) of every forward with LoRA rows
    real_rows_for = LoraSlotTable.rows_for

    def rows_for(self, slots, rank, phase):
        rows = real_rows_for(self, slots, rank, phase)
        if rows is not None:
            routed.append((phase, rows.kernel is not None))
        return rows

    monkeypatch.setattr(LoraSlotTable, "rows_for", rows_for)
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(fused_kernels=True, cuda_graphs=False))
    jobs = [("hello world", "lora-qv"), ("hello world", None), ("The quick brown fox", "team/lora-all")]
    try:
        results = run_together(runtime, jobs, GenerationParams(max_new_tokens=6))
    finally:
        runtime.close()
    for (prompt, adapter), events in zip(jobs, results, strict=True):
        expected = reference_greedy(tiny_model_dir, prompt, adapter_root / adapter if adapter else None, 6)
        assert events[-1].token_ids == expected, (prompt, adapter)
    assert phases and set(phases) == {"decode"}
    assert ("prefill", False) in routed and ("decode", True) in routed
    assert all(kernel == (phase == "decode") for phase, kernel in routed)
