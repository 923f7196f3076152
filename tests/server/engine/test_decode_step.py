"""The decode step's shape buckets (its GPU behaviour is checked by the parity suite on the device:
ADAPTERD_TEST_DEVICE=cuda)."""

from __future__ import annotations

from adapterd.server.engine.decode_step import batch_bucket, length_bucket, rank_bucket


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 3, 5, 13, 33, 64)] == [1, 4, 8, 16, 48, 64]
    assert batch_bucket(40, 32) == 32
    assert [length_bucket(n, 4096) for n in (1, 128, 129, 4095)] == [128, 128, 256, 4096]
    assert length_bucket(300, 200) == 200
    assert [rank_bucket(r, 64) for r in (0, 1, 8, 9, 16, 33)] == [0, 8, 8, 16, 16, 64]
    assert rank_bucket(40, 32) == 32


def test_prompt_buckets():
    from adapterd.server.engine.prefill_step import prompt_bucket

    assert [prompt_bucket(n, 4096) for n in (1, 16, 17, 100, 4000)] == [16, 16, 32, 128, 4096]
    assert prompt_bucket(3000, 2048) == 2048


def test_steps_past_pdl_max_rows_launch_without_pdl(tiny_model_dir, adapter_root, monkeypatch):
    """The decode forward runs with PDL as the device allows at up to ``pdl_max_rows`` rows (bucketed) and with
    it off past them (``support.pdl_off``), with the same tokens either way. The device is made to look like a
    Hopper GPU to the PDL check (the forward itself runs on the test device)."""
    from adapterd.server.engine import EngineConfig, GenerationParams
    from adapterd.server.engine.decode_step import PDL_MAX_ROWS
    from adapterd.server.kernels import support
    from adapterd.server.model import load_base_model
    from adapterd.server.runtime import Runtime
    from tests.helpers import TEST_DEVICE
    from tests.server.engine.test_parity import run_together

    monkeypatch.setattr(support, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ADAPTERD_PDL", raising=False)
    runtime = Runtime(load_base_model(tiny_model_dir, "none", TEST_DEVICE, "float32"), adapter_root,
                      EngineConfig(max_batch_size=8, run_ahead=False))
    decoder = runtime.engine.runner.decoder
    assert decoder.pdl_max_rows == PDL_MAX_ROWS >= 1
    decoder.bucketed = True
    seen: list[tuple[int, bool]] = []
    forward = decoder.forward

    def recording(ids, *rest):
        seen.append((ids.shape[0], support.pdl_enabled("cuda:0")))
        return forward(ids, *rest)

    decoder.forward = recording
    jobs = [("hello world", None), ("hello world", "lora-qv"), ("你是谁？", None)]
    try:
        decoder.pdl_max_rows = 2
        three = run_together(runtime, jobs, GenerationParams(max_new_tokens=4))
        one = run_together(runtime, jobs[:1], GenerationParams(max_new_tokens=4))
    finally:
        runtime.close()
    assert {rows for rows, _ in seen} == {4, 1}  # 3 rows in a bucket of 4, then one row
    assert all(pdl == (rows <= 2) for rows, pdl in seen), seen
    assert [e[-1].token_ids for e in three][:1] == [one[0][-1].token_ids]
