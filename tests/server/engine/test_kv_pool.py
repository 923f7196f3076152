"""The static key/value pool: per-row writes, views, growth, row moves, and the decode mask."""

from __future__ import annotations

import inspect

import pytest
import torch

from adapterd.server.engine.kv_pool import KvPool, decode_mask


def _pool(**kw) -> KvPool:
    args = dict(num_layers=2, kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"), max_rows=8,
                max_capacity=64, rows=2, capacity=4)
    args.update(kw)
    return KvPool(**args)


def test_update_writes_each_row_at_its_own_position_and_returns_the_view():
    pool = _pool()
    pool.reserve(2, 4)
    view = pool.decode_view(2, 4, torch.tensor([0, 2]))
    k = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 1, 3) + 1
    keys, values = view.update(k, -k, layer_idx=1)
    assert keys.shape == (2, 2, 4, 3)
    assert torch.equal(keys[0, :, 0], k[0, :, 0]) and torch.equal(keys[1, :, 2], k[1, :, 0])
    assert torch.equal(values[1, :, 2], -k[1, :, 0])
    assert keys[0, :, 1:].abs().sum() == 0 and keys[1, :, :2].abs().sum() == 0  # nothing else written
    assert pool.keys[0].abs().sum() == 0  # other layers untouched


def test_reserve_grows_by_doubling_and_keeps_entries():
    pool = _pool()
    pool.put(1, [(torch.ones(2, 3, 3), 2 * torch.ones(2, 3, 3))] * 2)
    generation = pool.generation
    pool.reserve(3, 5)
    assert (pool.rows, pool.capacity) == (4, 8) and pool.generation == generation + 1
    assert torch.equal(pool.keys[1][1, :, :3], torch.ones(2, 3, 3))
    assert torch.equal(pool.values[0][1, :, :3], 2 * torch.ones(2, 3, 3))
    pool.reserve(2, 4)  # already fits: no re-allocation
    assert pool.generation == generation + 1
    with pytest.raises(ValueError, match="exceed"):
        pool.reserve(9, 4)


def test_move_copies_a_rows_entries():
    pool = _pool()
    pool.put(1, [(torch.full((2, 3, 3), 5.0), torch.full((2, 3, 3), 6.0))] * 2)
    pool.move(1, 0, 3)
    assert torch.equal(pool.keys[1][0, :, :3], torch.full((2, 3, 3), 5.0))
    assert torch.equal(pool.values[0][0, :, :3], torch.full((2, 3, 3), 6.0))


def test_decode_mask_shows_each_row_its_entries_and_new_token():
    mask = decode_mask(torch.tensor([0, 2]), 4, torch.float32)
    assert mask.shape == (2, 1, 1, 4)
    low = torch.finfo(torch.float32).min
    assert mask[0, 0, 0].tolist() == [0.0, low, low, low]
    assert mask[1, 0, 0].tolist() == [0.0, 0.0, 0.0, low]


def test_prefill_writes_each_prompt_to_the_front_of_its_row_and_padding_after():
    from adapterd.server.engine.kv_pool import prefill_mask

    pool = _pool()
    pool.reserve(3, 4)
    pads = torch.tensor([1, 0])  # row 1 (pool row 1) has a 3-token prompt, row 2 (pool row 2) a 4-token one
    t = torch.arange(4)
    view = pool.prefill_view(torch.tensor([1, 2]), (t[None, :] - pads[:, None]) % 4)
    k = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32).view(2, 2, 4, 3)  # [rows, heads, T, dim]
    keys, values = view.update(k, -k, layer_idx=0)
    assert keys is k  # attention runs over the prompt's own keys
    assert torch.equal(pool.keys[0][1, :, :3], k[0, :, 1:])  # the prompt first...
    assert torch.equal(pool.keys[0][1, :, 3], k[0, :, 0])  # ...its padding after it
    assert torch.equal(pool.keys[0][2], k[1]) and torch.equal(pool.values[0][2], -k[1])
    assert pool.keys[0][0].abs().sum() == 0

    mask = prefill_mask(pads, 4, torch.float32)[:, 0]
    low = torch.finfo(torch.float32).min
    assert mask[0, 0].tolist() == [0.0, low, low, low]  # a padding query sees only itself
    assert mask[0, 3].tolist() == [low, 0.0, 0.0, 0.0]  # the last token sees the prompt, not the padding
    assert mask[1, 2].tolist() == [0.0, 0.0, 0.0, low]  # causal


def test_prefill_after_a_prefix_attends_to_it_and_writes_after_it():
    from adapterd.server.engine.kv_pool import prefill_mask

    pool = _pool()
    pool.reserve(2, 6)
    prefix = torch.full((2, 2, 3), 7.0)  # pool row 0: two virtual tokens; row 1: none
    pool.put(0, [(prefix, -prefix)])
    pads, virtual = torch.tensor([1, 0]), torch.tensor([2, 0])
    t = torch.arange(4)
    view = pool.prefill_view(torch.tensor([0, 1]), (t[None, :] - pads[:, None]) % 4 + virtual[:, None], prefix=2)
    k = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32).view(2, 2, 4, 3) + 100
    keys, values = view.update(k, -k, layer_idx=0)
    assert keys.shape == (2, 2, 6, 3)  # the prefix columns, then the prompt's own keys
    assert torch.equal(keys[0, :, :2], prefix) and torch.equal(values[0, :, :2], -prefix)
    assert torch.equal(keys[:, :, 2:], k)
    assert torch.equal(pool.keys[0][0, :, :2], prefix)  # the prefix stays in front...
    assert torch.equal(pool.keys[0][0, :, 2:5], k[0, :, 1:])  # ...the prompt follows it...
    assert torch.equal(pool.keys[0][0, :, 5], k[0, :, 0])  # ...and its padding comes last
    assert torch.equal(pool.keys[0][1, :, :4], k[1])

    mask = prefill_mask(pads, 4, torch.float32, virtual, 2)[:, 0]
    low = torch.finfo(torch.float32).min
    assert mask.shape == (2, 4, 6)
    assert mask[0, 3].tolist() == [0.0, 0.0, low, 0.0, 0.0, 0.0]  # both virtual tokens, then the prompt
    assert mask[0, 0].tolist() == [low, low, 0.0, low, low, low]  # a padding query sees only itself
    assert mask[1, 1].tolist() == [low, low, 0.0, 0.0, low, low]  # no prefix: its columns stay hidden


def _seen(mask: torch.Tensor) -> list[list[int]]:
    """Per query, the key columns it sees."""
    return [row.eq(0).nonzero().flatten().tolist() for row in mask]


def test_sliding_masks_equal_transformers_own_for_one_unpadded_row():
    """The window as transformers defines it (``sliding_window_overlay``: q - k < W), checked against
    transformers' own sliding-window mask for a plain row, in prefill and in decode."""
    from transformers import MistralConfig
    from transformers.masking_utils import create_sliding_window_causal_mask

    from adapterd.server.engine.kv_pool import prefill_mask

    config = MistralConfig(sliding_window=3, hidden_size=8, num_attention_heads=2)
    config._attn_implementation = "sdpa"
    length = 7
    params = inspect.signature(create_sliding_window_causal_mask).parameters  # 5.24 renamed past_key_values
    extra = {"cache" if "cache" in params else "past_key_values": None}
    if "cache_position" in params:  # transformers before 5.24 wanted it
        extra["cache_position"] = torch.arange(length)
    theirs = create_sliding_window_causal_mask(config=config, inputs_embeds=torch.zeros(1, length, 8),
                                               attention_mask=torch.ones(1, length, dtype=torch.long),
                                               position_ids=torch.arange(length)[None], **extra)
    ours = prefill_mask(torch.tensor([0]), length, torch.float32, window=3)
    assert torch.equal(ours.eq(0), theirs)
    assert _seen(ours[0, 0])[6] == [4, 5, 6]
    for q in range(length):  # decode: the new token at entry q sees what prefill's query q saw
        assert torch.equal(decode_mask(torch.tensor([q]), length, torch.float32, 3)[0, 0, 0], ours[0, 0, q])


def test_a_window_counts_positions_prefix_first_and_skips_padding():
    """PEFT puts a prefix's virtual tokens at positions 0..V-1 of the past, so they leave the window as the
    prompt grows; padding columns (left of a prompt, or between a right-aligned prefix and its prompt in the
    general prefill) take no position."""
    from adapterd.server.engine.kv_pool import causal_mask, prefill_mask

    pads, virtual = torch.tensor([2, 0]), torch.tensor([2, 0])
    mask = prefill_mask(pads, 5, torch.float32, virtual, prefix=3, window=3)[:, 0]
    # row 0: columns 0-1 virtual (positions 0, 1), column 2 unused, 3-4 padding, 5-7 prompt (positions 2-4)
    assert _seen(mask[0])[2:] == [[0, 1, 5], [1, 5, 6], [5, 6, 7]]
    assert _seen(mask[0])[:2] == [[3], [4]]  # padding queries see only themselves
    assert _seen(mask[1]) == [[3], [3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7]]  # no prefix: only the prompt's
    # the general prefill's layout: the prefix right-aligned in its columns, then the left-padded prompt
    live = torch.tensor([[False, True, True, False, True, True]])
    assert _seen(causal_mask(live, 3, torch.float32, window=2)[0, 0]) == [[3], [2, 4], [4, 5]]


def test_a_row_leaving_is_one_copy_and_one_zeroing_whatever_the_layers():
    """A row that leaves the batch moves the last row into its hole and zeroes what it left: one operation
    each over the one storage tensor, not one per layer and side (64 launches for a 7B model's 32 layers)."""
    pool = KvPool(32, 2, 4, torch.float32, torch.device("cpu"), max_rows=4, max_capacity=16, rows=4, capacity=16)
    pool.touch(0, 2, 8)
    for layer in range(32):
        pool.keys[layer][1, :, :8] = layer + 1.0
        pool.values[layer][1, :, :8] = -(layer + 1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pool.move(1, 0, 8)
        pool.release(1)
    ops = [e.name for e in prof.events()]
    assert ops.count("aten::copy_") == 1 and ops.count("aten::zero_") == 1, sorted(set(ops))
    for layer in range(32):  # every layer's entries moved, keys and values alike, and row 1 left empty
        assert torch.equal(pool.keys[layer][0, :, :8], torch.full((2, 8, 4), layer + 1.0))
        assert torch.equal(pool.values[layer][0, :, :8], torch.full((2, 8, 4), -(layer + 1.0)))
        assert not pool.keys[layer][1].any() and not pool.values[layer][1].any()
