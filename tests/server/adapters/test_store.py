"""Loaded adapters are held within a byte budget: least recently used out, reloaded on their next use."""

from __future__ import annotations

from adapterd.server.adapters.store import ON_DISK, RESIDENT_CPU, RESIDENT_GPU
from adapterd.server.engine import EngineConfig, GenerationParams
from adapterd.server.model import load_base_model
from adapterd.server.runtime import Runtime
from tests.helpers import TEST_DEVICE, reference_greedy
from tests.server.engine.test_parity import Collector


def test_least_recently_used_adapters_leave_when_the_budget_is_full(tiny_model_dir, adapter_root):
    base = load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32")
    probe = Runtime(base, adapter_root, EngineConfig())
    sizes = {a: probe.store.load(a).memory_bytes for a in ("lora-qv", "lora-rs", "team/lora-all")}
    budget = sizes["lora-qv"] + sizes["lora-rs"] + sizes["team/lora-all"] // 2  # room for two of the three
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(), max_loaded_adapter_bytes=budget)
    runtime.engine.start()
    try:
        store = runtime.store
        store.load("lora-qv")
        store.load("lora-rs")
        store.get("lora-qv")  # used again: now lora-rs is the least recently used
        store.load("team/lora-all")
        loaded = {a.adapter_id for a in store.loaded()}
        assert loaded == {"lora-qv", "team/lora-all"}
        assert sum(a.memory_bytes for a in store.loaded()) <= budget
        assert store.record("lora-rs").state == ON_DISK
        assert store.record("lora-qv").state in (RESIDENT_CPU, RESIDENT_GPU)
        # the evicted adapter is simply loaded again on its next request, with the right tokens
        sink = Collector()
        runtime.engine.submit("again", runtime.tokenize("hello world"), GenerationParams(max_new_tokens=8),
                              store.get("lora-rs"), sink)
        tokens = sink.wait_end()[-1].token_ids
        assert tokens == reference_greedy(tiny_model_dir, "hello world", adapter_root / "lora-rs", 8)
        assert store.record("lora-rs").state in (RESIDENT_CPU, RESIDENT_GPU)
    finally:
        runtime.close()


def test_pack_host_keeps_values_in_one_buffer():
    import torch

    from adapterd.server.adapters.store import pack_host

    tensors = [torch.randn(3, 5), torch.randn(7, 2), torch.randn(4)]
    packed = pack_host(tensors, torch.bfloat16, pin=False)
    assert [p.shape for p in packed] == [t.shape for t in tensors]
    assert all(torch.equal(p, t.to(torch.bfloat16)) for p, t in zip(packed, tensors, strict=True))
    storage = {p.untyped_storage().data_ptr() for p in packed}
    assert len(storage) == 1
