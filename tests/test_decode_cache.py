"""The KV cache keeps exactly the accepted tokens: after every step its visible slots equal the K/V of a plain
causal forward over the committed tokens (prompt + emitted tokens except the pending first draft), so rejected
drafts and mask tokens never leak in. Also: streaming yields the same tokens as the one-jit generate."""

from __future__ import annotations

import jax
import numpy as np
import pytest


from test_decode_support import pattern_prompts, plain_forward, trained_decoder

MAX_NEW = 24  # same program signature as the lossless tests, so the generate programs are shared


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def plain_kv(dec, rows):
    """K/V of one plain causal forward (no cache) over each row, right-padded into one jitted batch; causal
    attention makes each row's K/V independent of the padding after it."""
    kv = plain_forward(dec, rows)[1]
    return [(kv.k_LNTKD[:, i], kv.v_LNTKD[:, i]) for i in range(len(rows))]


@pytest.mark.parametrize("mode,block", [("tidar", 4), pytest.param("ar", 1, marks=pytest.mark.slow)])
def test_committed_kv_equals_plain_causal_forward(mode, block):
    dec = trained_decoder("float64")
    prompts = pattern_prompts([5, 2, 9, 12], seed=21)
    stream = dec.stream(prompts, mode=mode, block_size=block, max_new_tokens=MAX_NEW)
    emitted = [[] for _ in prompts]
    snapshots = []  # (cache lengths, cache k, cache v, done, tokens emitted so far) after prefill and each step
    for chunk in stream:
        for row, toks in enumerate(chunk):
            emitted[row] += toks
        state = jax.device_get(stream.state)
        snapshots.append((np.asarray(state.cache.length_N), state.cache.k_LNCKD, state.cache.v_LNCKD,
                          np.asarray(state.done_N), [len(e) for e in emitted]))
    # causal attention: the K/V of a prefix do not depend on later tokens, so one forward per row over
    # prompt + everything emitted is the reference for every snapshot
    refs = plain_kv(dec, [p + e for p, e in zip(prompts, emitted)])
    accepted_seen = set()
    for i, (lengths, k, v, done, n_emitted) in enumerate(snapshots):
        if i:
            accepted_seen.update((lengths - snapshots[i - 1][0])[~snapshots[i - 1][3]].tolist())
        for row, prompt in enumerate(prompts):
            if not done[row]:  # active: committed = prompt + emitted except the pending first draft
                assert lengths[row] == len(prompt) + n_emitted[row] - 1
            # (a finished row may hold accepted tokens beyond its max_new cut; they are AR-exact too)
            visible = min(lengths[row], len(prompt) + n_emitted[row])
            np.testing.assert_allclose(k[:, row, :visible], refs[row][0][:, :visible], atol=1e-10)
            np.testing.assert_allclose(v[:, row, :visible], refs[row][1][:, :visible], atol=1e-10)
    if mode == "tidar":  # partial acceptance (rejected drafts written, then hidden) really happened
        assert any(1 <= k < block for k in accepted_seen) and any(k > 1 for k in accepted_seen), accepted_seen
    assert emitted == stream.result.tokens
    assert stream.result.tokens == dec.generate(prompts, mode=mode, block_size=block, max_new_tokens=MAX_NEW).tokens
