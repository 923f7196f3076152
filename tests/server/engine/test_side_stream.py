"""engine/side_stream.py: a LoRA shrink launched beside its layer's base matmul, on a second stream."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.engine import side_stream
from adapterd.server.engine.side_stream import beside


def test_off_the_gpu_both_calls_run_main_first_on_the_current_stream():
    """The matmul (main) first, then the shrink (side): under PDL each LoRA kernel then follows one that lets it
    start early (side_stream.py's note)."""
    calls = []
    x = torch.ones(3)
    got = beside(x, lambda: calls.append("side") or x * 2, lambda: calls.append("main") or x + 1)
    assert calls == ["main", "side"]
    assert torch.equal(got[0], x * 2) and torch.equal(got[1], x + 1)


def test_switched_off_it_runs_both_on_the_current_stream_on_a_gpu_too(monkeypatch):
    """``SIDE_STREAM`` off: no stream is asked for (on a CUDA tensor too; faked here, nothing runs)."""
    monkeypatch.setattr(side_stream, "SIDE_STREAM", False)
    monkeypatch.setattr(side_stream, "side_stream", lambda device: pytest.fail("a side stream was made"))

    class OnGpu:
        is_cuda = True

    assert beside(OnGpu(), lambda: 1, lambda: 2) == (1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("captured", [False, True])
def test_on_a_gpu_the_side_call_runs_on_the_second_stream_and_the_next_launch_sees_both(captured, monkeypatch):
    """The side call's launches go to the device's second stream, the main call's to the current one, and what
    the current stream launches next reads both results complete: eagerly, and in a CUDA graph (the side stream
    joins the capture). A slow side (a long chain of small kernels) makes a missing join show as a wrong sum."""
    monkeypatch.setattr(side_stream, "SIDE_STREAM", True)
    x = torch.randn(1 << 20, device="cuda")
    streams = {}

    def side():
        streams["side"] = torch.cuda.current_stream()
        y = x
        for _ in range(200):  # ~200 launches: still running when the main call's launch ends, unless joined
            y = y * 1.0001
        return y

    def main():
        streams["main"] = torch.cuda.current_stream()
        return x + 1

    def step():
        a, b = beside(x, side, main)
        return a + b

    expected = x * 1.0001 ** 200 + x + 1
    if captured:
        step()  # warm up, as the engine does before a capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
    else:
        out = step()
    torch.cuda.synchronize()
    assert streams["side"] == side_stream.side_stream(x.device)
    assert streams["main"] != streams["side"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
