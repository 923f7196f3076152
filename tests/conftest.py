"""Shared fixtures: the tiny model (built once per session) and PEFT-made adapters in an adapter root."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# One torch (OpenMP) thread in the test process and every process it starts, unless set otherwise: the tiny
# model's operations are too small for threads to pay, and on the 2-core machine two threads spin against each
# other and whatever else runs (test_parity + test_generate_rpc: 35 s on two threads and 19 s on one with the
# machine nearly idle, 98 s and 39 s while other jobs ran; bench/RESULTS.md). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tests.helpers import make_lora_adapter, make_prefix_adapter  # noqa: E402

# ADAPTERD_TEST_SWITCHES: comma-separated switches of the server, "<module under adapterd.server>.<attribute>" (as
# "kernels.int8_shrink.IN_MATMUL"), that are off by default until a GPU run has timed and checked them, turned on
# for the whole run (bench/gpu_decode.sh's shrink part runs the GPU parity suite so; tests/test_switches.py checks
# that each named one is on).
SWITCHES = [name for name in os.environ.get("ADAPTERD_TEST_SWITCHES", "").split(",") if name]


def _squeeze_interpreter_scalars() -> None:
    """Triton 3.6's interpreter (the GPU image's) turns a scalar, which it holds as a 1-element array, into a
    Python int with ``int(array)``: NumPy 2.4 refuses that for an array of one dimension, so every kernel test with
    a loop bound from a program id fails there before it runs. Triton 3.9 squeezes the array first; the same
    one-line change is applied here, to the interpreter's own patch of ``tl.tensor`` (undone with it)."""
    try:
        import numpy
        from triton.runtime import interpreter
    except ImportError:
        return
    try:
        int(numpy.zeros(1))
        return  # this NumPy still converts it
    except TypeError:
        pass
    patch_tensor = interpreter._patch_lang_tensor

    def patch_with_squeeze(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_squeeze


_squeeze_interpreter_scalars()


@pytest.fixture(autouse=True, scope="session")
def named_switches_on():
    with pytest.MonkeyPatch.context() as patch:
        for name in SWITCHES:
            module, attribute = name.rsplit(".", 1)
            patch.setattr(importlib.import_module(f"adapterd.server.{module}"), attribute, True)
        yield SWITCHES


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the device machine only; elsewhere they are reported as skipped, never passed."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # the client-only install
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from adapterd.common.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_model_dir) -> Path:
    """An adapter root holding LoRA and prefix adapters of several shapes, all written by plain PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    make_lora_adapter(tiny_model_dir, root / "lora-qv", r=8, alpha=32, targets=["q_proj", "v_proj"], seed=1)
    make_lora_adapter(
        tiny_model_dir,
        root / "team" / "lora-all",
        r=4,
        alpha=8,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        seed=2,
    )
    make_lora_adapter(tiny_model_dir, root / "lora-rs", r=16, alpha=16, targets=["q_proj", "o_proj"],
                      seed=3, use_rslora=True)
    make_prefix_adapter(tiny_model_dir, root / "prefix", num_virtual_tokens=6, projection=False, seed=4)
    make_prefix_adapter(tiny_model_dir, root / "prefix-proj", num_virtual_tokens=3, projection=True, seed=5)
    return root


GITCLONE = Path(importlib.util.find_spec("adapterd.trainer").origin).parent / "examples" / "gitclone.json"


@pytest.fixture(scope="session")
def gitclone_data() -> Path:
    """The demo's Alpaca-style data, shipped with the trainer."""
    return GITCLONE


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for trainer subprocesses: offline, one thread, the repo importable; a child that dies of a
    signal prints its Python stacks first."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    return env
