"""Property: whatever a tenant puts in the adapter root, the store answers with a loaded adapter or a
documented error, never a traceback or a server path, and the listing always answers for everyone.

Random adapter configs (wrong types, NaN, huge integers, nesting, pattern keys), random safetensors headers and
bytes, and random ids are thrown at one store; every listing is also turned into the protobuf answer
(``service.adapter_info``), which is where out-of-range numbers and unencodable strings used to fail.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterd.server.adapters.store import LOAD_FAILED, AdapterStore
from adapterd.server.errors import AdapterdError
from adapterd.server.service import adapter_info
from tests.server.adapters.test_store import _cpu_shape

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED}
PATTERN_KEYS = st.sampled_from(["q_proj", "v_proj", r"layers\.0\..*", "(.|.)*(.|.)*(.|.)*Z", r"(a)\1", "(?=q)x",
                                "(", "a)|(q_proj", "[z-a]", "x" * 2000])
NUMBERS = st.one_of(st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), st.text(max_size=8))
JSON_VALUES = st.recursive(st.one_of(NUMBERS, st.text(max_size=12)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=12)
CONFIGS = st.fixed_dictionaries(
    {"peft_type": st.one_of(st.sampled_from(["LORA", "PREFIX_TUNING", "P_TUNING", ""]), JSON_VALUES)},
    optional={
        "r": NUMBERS, "lora_alpha": NUMBERS, "use_rslora": st.one_of(st.booleans(), NUMBERS),
        "num_virtual_tokens": NUMBERS, "target_modules": JSON_VALUES, "base_model_name_or_path": JSON_VALUES,
        "alpha_pattern": st.one_of(st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3), JSON_VALUES),
        "rank_pattern": st.one_of(st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3), JSON_VALUES),
        "prefix_projection": st.booleans(), "use_dora": st.booleans(), "nested": JSON_VALUES,
    })
HEADER_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "X", ""]),
    "shape": st.lists(st.integers(-2, 80), max_size=3),
    "data_offsets": st.lists(st.integers(-5, 5000), min_size=0, max_size=3)})
WEIGHTS = st.one_of(
    st.just("valid"),  # lora-qv's own tensors: the config decides
    st.binary(max_size=64),
    st.tuples(st.dictionaries(st.text(max_size=40), st.one_of(HEADER_ENTRY, JSON_VALUES), max_size=4),
              st.binary(max_size=4096)),
)
IDS = st.one_of(st.text(max_size=30), st.sampled_from(["lora-qv", "../x", "/etc", "a/../../b", ".hidden", "a//b"]))

_names = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, adapter_root):
    root = tmp_path_factory.mktemp("props") / "adapters"
    shutil.copytree(adapter_root, root)
    return root, AdapterStore(root, _cpu_shape(tiny_model_dir, torch.float32)), adapter_root


def _write_weights(path, weights, adapter_root) -> None:
    target = path / "adapter_model.safetensors"
    if weights == "valid":
        shutil.copy(adapter_root / "lora-qv" / "adapter_model.safetensors", target)
    elif isinstance(weights, bytes):
        target.write_bytes(weights)
    else:
        header, data = weights
        raw = json.dumps(header).encode()
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _check_error(exc: AdapterdError, root) -> None:
    assert exc.code in DOCUMENTED, (exc.code, str(exc))
    assert str(root.parent) not in str(exc) and "Traceback" not in str(exc), str(exc)


def _check_listing(store: AdapterStore, root) -> None:
    for record in store.list():
        adapter_info(record).SerializeToString()  # in range and encodable: the RPC can answer
        if record.state == LOAD_FAILED:
            assert str(root.parent) not in record.error


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.one_of(CONFIGS, JSON_VALUES), weights=WEIGHTS)
def test_any_adapter_files_load_or_fail_with_a_documented_code(world, config, weights):
    root, store, adapter_root = world
    adapter_id = f"random-{next(_names)}"
    (root / adapter_id).mkdir()
    (root / adapter_id / "adapter_config.json").write_text(json.dumps(config))
    _write_weights(root / adapter_id, weights, adapter_root)
    try:
        adapter = store.load(adapter_id)
    except AdapterdError as exc:
        _check_error(exc, root)
    else:
        assert adapter.type in ("LORA", "PREFIX_TUNING")
        store.unload(adapter_id)
    _check_listing(store, root)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(adapter_id=IDS)
def test_any_id_loads_or_fails_with_a_documented_code(world, adapter_id):
    root, store, _ = world
    try:
        store.get(adapter_id)
    except AdapterdError as exc:
        _check_error(exc, root)


def test_the_store_still_loads_good_adapters_exactly_after_the_random_ones(world):
    from adapterd.server.adapters.peft_format import read_adapter

    root, store, adapter_root = world
    _check_listing(store, root)
    loaded = store.get("team/lora-all")
    want = read_adapter(adapter_root, adapter_root / "team" / "lora-all").tensors
    for name, module in loaded.lora.modules.items():
        assert torch.equal(module.a, want[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(module.b, want[f"base_model.model.{name}.lora_B.weight"])
