"""The kernels' sm_90 compile tests (``-m sm90``) again under the GPU image's Triton.

The H200's image runs torch 2.11, which pins Triton 3.6.0; this machine's venv has 3.9. The two compile the same
kernel differently: under 3.6, a pointer or stride picked by a branch loses the 16-divisibility Triton
specialized it with, and LoRA's expand read its B tile 2 bytes a load (128 loads a thread, not 16) on the GPU
until 3.9's tests were run under 3.6 too. ``scripts/setup`` installs 3.6.0 beside the venv
(``.venv/gpu-image-triton``); this test runs the compile tests in a process that imports it first.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
GPU_IMAGE_TRITON = ROOT / ".venv" / "gpu-image-triton"
GPU_IMAGE_VERSION = "3.6.0"  # torch 2.11's pin (../shared/reference/stack-notes.md); scripts/setup installs it


def _sm90_tests() -> int:
    """How many tests carry the sm90 mark here (collected under this process's Triton)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--collect-only", "-m", "sm90", "tests/server/kernels"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"(\d+)/\d+ tests collected", out).group(1))


def test_every_kernel_compiles_for_hopper_under_the_gpu_images_triton(subprocess_env):
    triton = pytest.importorskip("triton")
    if triton.__version__ == GPU_IMAGE_VERSION:  # the GPU machine itself: the sm90 tests run under it already
        pytest.skip(f"this process's Triton is the GPU image's {GPU_IMAGE_VERSION}")
    if not (GPU_IMAGE_TRITON / "triton").is_dir():
        pytest.fail(f"the GPU image's Triton is not at {GPU_IMAGE_TRITON}: run ./scripts/setup")
    env = dict(subprocess_env, PYTHONPATH=str(GPU_IMAGE_TRITON))
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == GPU_IMAGE_VERSION
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "-m", "sm90", "tests/server/kernels"], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-6000:]
    assert re.match(rf"{_sm90_tests()} passed", summary) and "skipped" not in summary, summary
