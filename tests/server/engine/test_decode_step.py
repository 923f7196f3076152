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
