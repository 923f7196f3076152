"""bench/kernel_grads.py: the LoRA gradient of the trainer's bf16 numerics against fp32's. On the CPU the plain
bf16 variant runs through the command line (liger's kernels are Triton, CUDA only); on the GPU each of liger's
kernels that ``--kernels`` patches must keep the gradient as close to fp32's as plain bf16 keeps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TEST_DEVICE

REPO = Path(__file__).resolve().parent.parent.parent
# A kernel computing the same maths rounds in another order: its error beside plain bf16's (~1.4e-2 on the
# tiny model) stays of the same size. One computing a different gradient lands far off it.
WORSE_THAN_BF16 = 1.5


def _run(tmp_path: Path, *args: str) -> dict:
    out_json = tmp_path / "grads.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_grads.py"), "--json-out", str(out_json),
                           *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRA gradient's relative L2 error against fp32" in done.stdout
    return json.loads(out_json.read_text())["measurements"][0]


def test_plain_bf16_on_the_cpu_is_near_fp32_and_reported(tmp_path):
    """The reference and the bf16 variant agree as bf16 can (the gradient within a few percent, the loss within
    bf16's rounding); every LoRA matrix has its figure."""
    result = _run(tmp_path, "--device", "cpu", "--variants", "bf16")
    for batch, row in result["variants"]["bf16"].items():
        assert row["loss"] == pytest.approx(row["loss_fp32"], rel=1e-2), batch
        assert set(row["error"]) == {"all", "q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
        assert 0 < row["error"]["all"] < 5e-2, (batch, row["error"])


@pytest.mark.gpu
@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="runs with ADAPTERD_TEST_DEVICE=cuda (bench/gpu_train.sh grads)")
def test_each_liger_kernel_keeps_the_lora_gradient_as_close_to_fp32_as_bf16(tmp_path):
    pytest.importorskip("liger_kernel")
    result = _run(tmp_path, "--device", "cuda")["variants"]
    for variant in ("+rope", "+rms_norm", "+swiglu", "+all"):
        for batch, row in result[variant].items():
            plain = result["bf16"][batch]["error"]["all"]
            assert row["error"]["all"] <= WORSE_THAN_BF16 * plain, (variant, batch, row["error"]["all"], plain)


def test_the_grads_part_of_gpu_train_sh_on_the_cpu(tmp_path):
    """``bash bench/gpu_train.sh grads``, as the device call runs it, with ``GRADS_ARGS`` keeping it to the CPU's
    one variant: the table in the log and the JSON in $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "SITE": str(tmp_path / "site"),
           "GRADS_ARGS": "--device cpu --variants bf16",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh"), "grads"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LoRA gradient's relative L2 error against fp32 (cpu, B at random)" in (out / "kernel_grads.log").read_text()
    (measured,) = json.loads((out / "kernel_grads.json").read_text())["measurements"]
    assert set(measured["variants"]) == {"bf16"} and measured["adapter"] == "B at random"


def test_after_steps_measures_again_at_the_adapter_plain_peft_reached(tmp_path):
    """``--after-steps 0,3``: at the start (B at random) and at plain PEFT's LoRA after 3 steps of the curve's run,
    each labelled; the trained adapter is another point (another loss) and bf16 stays near fp32 there too."""
    out_json = tmp_path / "grads.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_grads.py"), "--device", "cpu", "--variants",
                           "bf16", "--after-steps", "0,3", "--json-out", str(out_json)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cpu, plain PEFT's LoRA after 3 steps):" in done.stdout
    start, trained = json.loads(out_json.read_text())["measurements"]
    assert (start["after_steps"], trained["after_steps"]) == (0, 3)
    assert trained["adapter"] == "plain PEFT's LoRA after 3 steps"
    for batch in ("records", "random"):
        row = trained["variants"]["bf16"][batch]
        assert row["loss_fp32"] != start["variants"]["bf16"][batch]["loss_fp32"]
        assert 0 < row["error"]["all"] < 5e-2, (batch, row["error"])
