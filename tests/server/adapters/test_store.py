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


def _cpu_shape(tiny_model_dir, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from adapterd.server.adapters.lora import linear_shapes
    from adapterd.server.adapters.store import BaseShape

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    c = model.config
    return BaseShape(linear_shapes=linear_shapes(model), num_layers=c.num_hidden_layers,
                     num_kv_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                     dtype=dtype, device=torch.device("cpu"), max_lora_rank=64)


def _storage_ptr(adapter) -> int:
    return next(iter(adapter.lora.modules.values())).a.untyped_storage().data_ptr()


def test_store_lends_pool_buffers_to_loaded_adapters_and_reuses_them_after_unload(tiny_model_dir, adapter_root):
    import torch

    from adapterd.server.adapters.peft_format import read_adapter
    from adapterd.server.adapters.store import AdapterStore

    store = AdapterStore(adapter_root, _cpu_shape(tiny_model_dir, torch.float32))
    first = store.load("lora-qv")
    ptr = _storage_ptr(first)
    other = store.load("lora-rs")  # lora-qv is still loaded: its buffer is not lent again
    assert _storage_ptr(other) != ptr
    del first
    store.unload("lora-qv")  # nothing refers to its weights any more: the buffer is back
    before = store.host_pool.stats()
    again = store.load("lora-qv")
    assert _storage_ptr(again) == ptr
    after = store.host_pool.stats()
    assert after["reuses"] == before["reuses"] + 1 and after["allocations"] == before["allocations"]
    want = read_adapter(adapter_root, adapter_root / "lora-qv").tensors  # a private read: the values are this file's
    for name, module in again.lora.modules.items():
        a = next(v for k, v in want.items() if k.startswith(f"base_model.model.{name}.lora_A"))
        assert torch.equal(module.a, a)


def test_store_packs_converted_weights_into_pool_buffers(tiny_model_dir, adapter_root):
    import torch

    from adapterd.server.adapters.store import AdapterStore

    store = AdapterStore(adapter_root, _cpu_shape(tiny_model_dir, torch.bfloat16))  # fp32 files, bf16 base
    adapter = store.load("lora-qv")
    module = next(iter(adapter.lora.modules.values()))
    assert module.a.dtype == torch.bfloat16
    stats = store.host_pool.stats()
    assert stats["allocations"] == 2 and stats["lent_bytes"] == store.host_pool.capacity_for(
        sum(m.a.nbytes + m.b.nbytes for m in adapter.lora.modules.values()))  # the read buffer came back
    want = {name: m.a.clone() for name, m in adapter.lora.modules.items()}
    del adapter, module
    store.unload("lora-qv")
    again = store.load("lora-qv")  # both buffers (the read's, the pack's) come from the pool again
    assert store.host_pool.stats()["allocations"] == 2 and store.host_pool.stats()["reuses"] == 2
    assert all(torch.equal(again.lora.modules[name].a, a) for name, a in want.items())


def test_store_host_pool_cap_follows_the_loaded_budget(tiny_model_dir, adapter_root):
    import torch

    from adapterd.server.adapters.store import AdapterStore
    from adapterd.server.pinned import DEFAULT_MAX_BYTES

    shape = _cpu_shape(tiny_model_dir, torch.float32)
    assert AdapterStore(adapter_root, shape).host_pool.max_bytes == DEFAULT_MAX_BYTES
    assert AdapterStore(adapter_root, shape, max_loaded_bytes=DEFAULT_MAX_BYTES).host_pool.max_bytes == \
        2 * DEFAULT_MAX_BYTES
    assert AdapterStore(adapter_root, shape, host_pool_bytes=1 << 20).host_pool.max_bytes == 1 << 20
