"""The authors' SGLang TiDAR server builds its prefill and decode attention masks and positions with its own code;
ported here, they equal ``tidar_jax.masks`` (``prefill_mask``/``prefill_positions``, ``decode_mask``/
``decode_positions``) for several prompt lengths and block sizes, so a model trained here is served with the
layout it was trained and decoded with.

The port: repository ``Jingyu6/sglang``, file ``tidar_sglang/python/sglang/srt/speculative/tidar_utils.py`` at
commit ``8f861c68685001e46375bad8fcefc26893a92503``, functions ``build_tidar_positions_and_mask_prefill`` and
``build_tidar_positions_and_mask_decode`` (Apache-2.0, NVIDIA), rewritten in numpy with the same outputs: the
step's token ids, positions, and the "custom mask" SGLang's attention backends take, each sequence's
``[queries, prefix + step]`` boolean mask flattened and concatenated over the batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from tidar_jax.masks import decode_layout, decode_mask, decode_positions, prefill_mask, prefill_positions

MASK_ID = 151662  # the fork's worker: self.mask_token_id


def fork_prefill(seq_lens, b):
    """Port of ``build_tidar_positions_and_mask_prefill``: b mask queries per sequence after its prompt, at
    positions L..L+b-1, each attending to the whole prompt and all b masks."""
    seq_lens = np.asarray(seq_lens)
    bs = len(seq_lens)
    positions = np.repeat(seq_lens, b) + np.tile(np.arange(b), bs)
    tokens = np.full(bs * b, MASK_ID, np.int32)
    custom_mask = np.ones(int(b * seq_lens.sum() + bs * b * b), bool)
    return tokens, positions, custom_mask


def fork_decode(seq_lens, b, prev_drafts):
    """Port of ``build_tidar_positions_and_mask_decode``: ``[b drafts | b groups of b masks]`` per sequence; draft
    i at L+i, group j's slot t at L+j+t; every query sees the committed prefix; drafts causal among themselves;
    group j sees drafts 0..j-1 and its own group."""
    seq_lens = np.asarray(seq_lens)
    bs, t = len(seq_lens), b * (b + 1)
    offsets = (np.arange(b + 1)[None, :] + np.arange(b + 1)[:, None])[:, :b].reshape(-1)
    positions = np.repeat(seq_lens, t) + np.tile(offsets, bs)
    tokens = np.concatenate([np.asarray(prev_drafts).reshape(bs, b), np.full((bs, b * b), MASK_ID)], -1).reshape(-1)
    masks = []
    for length in seq_lens:
        step = np.zeros((t, t), bool)
        step[:b, :b] = np.tril(np.ones((b, b), bool))
        for j in range(1, b + 1):
            step[j * b:(j + 1) * b, j * b:(j + 1) * b] = True
            step[j * b:(j + 1) * b, :j] = True
        masks.append(np.concatenate([np.ones((t, length), bool), step], -1).reshape(-1))
    return tokens, positions, np.concatenate(masks)


def unflatten(custom_mask, seq_lens, q):
    """The per-sequence ``[q, L + q]`` masks of a flattened custom mask."""
    out, start = [], 0
    for length in seq_lens:
        size = q * (length + q)
        out.append(custom_mask[start:start + size].reshape(q, length + q))
        start += size
    assert start == custom_mask.size
    return out


CASES = [(1, (1, 3)), (2, (4, 1, 7)), (4, (8, 2, 5)), (8, (3, 16)), (16, (1, 20))]


@pytest.mark.parametrize("b,seq_lens", CASES, ids=[f"B{b}-L{'_'.join(map(str, L))}" for b, L in CASES])
def test_prefill_mask_and_positions_equal_the_servers(b, seq_lens):
    tokens, positions, custom = fork_prefill(seq_lens, b)
    padded = max(seq_lens) + 3  # our prompts are padded to a common length
    ours = np.asarray(prefill_mask(np.asarray(seq_lens), padded, b))
    ours_pos = np.asarray(prefill_positions(np.asarray(seq_lens), padded, b))
    assert (tokens == MASK_ID).all()
    for n, (length, theirs) in enumerate(zip(seq_lens, unflatten(custom, seq_lens, b))):
        queries = ours[n, padded:]  # our b mask queries, over [prompt padded to P | masks]
        np.testing.assert_array_equal(queries[:, :length], theirs[:, :length])  # the real prompt
        np.testing.assert_array_equal(queries[:, padded:], theirs[:, length:])  # the masks
        assert not queries[:, length:padded].any()  # padding, which the server has no slot for
        np.testing.assert_array_equal(ours_pos[n, padded:], positions[n * b:(n + 1) * b])
        # the server's prompt (its ordinary causal extend) is causal over real tokens here too
        np.testing.assert_array_equal(ours[n, :length, :length], np.tril(np.ones((length, length), bool)))


@pytest.mark.parametrize("b,seq_lens", CASES, ids=[f"B{b}-L{'_'.join(map(str, L))}" for b, L in CASES])
def test_decode_mask_and_positions_equal_the_servers(b, seq_lens):
    t = b * (b + 1)
    drafts = np.arange(len(seq_lens) * b) + 100
    tokens, positions, custom = fork_decode(seq_lens, b, drafts)
    cache = max(seq_lens) + 5  # our cache has free slots beyond each row's committed length
    ours = np.asarray(decode_mask(np.asarray(seq_lens), b, cache))
    ours_pos = np.asarray(decode_positions(np.asarray(seq_lens), b))
    group_T, _ = decode_layout(b)
    for n, (length, theirs) in enumerate(zip(seq_lens, unflatten(custom, seq_lens, t))):
        np.testing.assert_array_equal(ours[n, :, :length], theirs[:, :length])  # the committed prefix
        assert not ours[n, :, length:cache].any()  # free cache slots
        np.testing.assert_array_equal(ours[n, :, cache:], theirs[:, length:])  # the step tokens
        np.testing.assert_array_equal(ours_pos[n], positions[n * t:(n + 1) * t])
        row = tokens[n * t:(n + 1) * t]  # the same token layout: the drafts, then mask groups
        np.testing.assert_array_equal(row[np.asarray(group_T) == 0], drafts[n * b:(n + 1) * b])
        assert (row[np.asarray(group_T) > 0] == MASK_ID).all()
