"""Pruned mask groups and the LM-head strategy: the step layout equals an independent reference (and the full
decode mask when every group is drafted), the fallback draft rule equals a plain-Python reference, and lossless
greedy TiDAR still equals greedy AR token for token for several (B, groups) and both head strategies, with the
committed cache equal to a causal forward over the committed tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import decode_step_mask_groups_ref, next_drafts_ref
from test_decode_cache import plain_kv
from test_decode_support import pattern_prompts, trained_decoder
from tidar_jax import masks
from tidar_jax.decode import layout

MAX_NEW = 24


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("block,counts", [(1, (1,)), (2, (1,)), (4, (1, 2)), (4, (2, 4)), (4, (3,)),
                                          (5, (1, 2, 3, 4, 5))])
def test_step_layout_matches_reference(block, counts):
    ref_mask, ref_pos = decode_step_mask_groups_ref(block, counts)
    length_N = jnp.asarray([0, 7])
    step = masks.decode_attention_layout(length_N, block, 9, counts=counts)
    np.testing.assert_array_equal(step.local_mask(), np.asarray(ref_mask))
    pos = np.asarray(step.positions())
    np.testing.assert_array_equal(pos, np.asarray([ref_pos, [p + 7 for p in ref_pos]]))
    # over [cache | step]: each row sees exactly its committed cache slots, then the reference's local mask
    dense = np.asarray(step.block())
    for row, length in enumerate([0, 7]):
        np.testing.assert_array_equal(dense[row, :, :9], np.broadcast_to(np.arange(9) < length, (len(ref_pos), 9)))
        np.testing.assert_array_equal(dense[row, :, 9:], np.asarray(ref_mask))
    if counts == tuple(range(1, block + 1)):  # every group: exactly the engine's original decode mask
        np.testing.assert_array_equal(dense, np.asarray(masks.decode_mask(length_N, block, 9)))
        np.testing.assert_array_equal(pos, np.asarray(masks.decode_positions(length_N, block)))


@pytest.mark.parametrize("block,counts", [(4, (1,)), (4, (2, 3)), (6, (1, 2, 6)), (3, (1, 2, 3))])
def test_next_drafts_match_reference(block, counts):
    rng = np.random.default_rng(block)
    drafts = rng.integers(0, 100, block).tolist()
    group_argmax = {k: rng.integers(100, 200, block).tolist() for k in counts}
    for verifier_slot0 in (True, False):
        for k in range(1, block + 1):
            group_N, shift_N = layout.next_draft_source(jnp.asarray([k]), block, counts)
            g = int(group_N[0])
            source = group_argmax[counts[g - 1]] if g else drafts
            got = layout.next_drafts(jnp.asarray([source]), shift_N, jnp.asarray([999]), verifier_slot0)
            want = next_drafts_ref(k, block, counts, drafts, group_argmax, 999)
            if k in counts and not verifier_slot0:  # a covered count keeps its own slot 0 (slot0="diffusion")
                want[0] = group_argmax[k][0]
            assert np.asarray(got)[0].tolist() == want, (k, verifier_slot0)


# one (B, groups, head) by default (the selective head: every other decode test runs the default one_pass; the
# cache test below covers other groups); the rest with -m slow
@pytest.mark.parametrize("block,groups,head", [(8, (1, 3, 8), "selective")] + [
    pytest.param(b, g, h, marks=pytest.mark.slow) for b, g, h in [(4, 1, "selective"), (4, (2, 4), "one_pass"),
                                                                  (8, 2, "selective"), (4, None, "one_pass")]])
def test_pruned_groups_lossless(block, groups, head):
    dec = trained_decoder("float64")
    prompts = pattern_prompts([5, 2, 9, 12], seed=block)
    ar = dec.generate(prompts, mode="ar", max_new_tokens=MAX_NEW)
    td = dec.generate(prompts, mode="tidar", block_size=block, groups=groups, head=head, max_new_tokens=MAX_NEW,
                      allow_untrained_block_size=True)
    assert td.tokens == ar.tokens
    hist = {int(k): c for k, c in td.stats["accepted_length_hist"].items()}
    assert sum(c for k, c in hist.items() if k > 1) > 0, hist  # multi-token acceptance really happened
    counts = td.stats["groups"]
    assert any(c for k, c in hist.items() if k not in counts) or counts == list(range(1, block + 1)), hist


def test_pruned_groups_cache_equals_causal_forward():
    """After every step of a pruned (B=4, groups=(2,)) stream with paged cache attention over 5-slot pages (many
    pages, a clamped last page) the visible cache equals a plain causal forward."""
    dec = trained_decoder("float64")
    prompts = pattern_prompts([5, 2, 9, 12], seed=21)
    stream = dec.stream(prompts, mode="tidar", block_size=4, groups=(2,), max_new_tokens=MAX_NEW, cache_page=5)
    emitted, snapshots = [[] for _ in prompts], []
    for chunk in stream:
        for row, toks in enumerate(chunk):
            emitted[row] += toks
        state = jax.device_get(stream.state)  # read before resuming: the next step donates this state
        snapshots.append((np.asarray(state.cache.length_N), state.cache.k_LNCKD, state.cache.v_LNCKD,
                          [len(e) for e in emitted]))
    refs = plain_kv(dec, [p + e for p, e in zip(prompts, emitted)])
    for lengths, k, v, n_emitted in snapshots:
        for row, prompt in enumerate(prompts):
            visible = min(lengths[row], len(prompt) + n_emitted[row])
            np.testing.assert_allclose(k[:, row, :visible], refs[row][0][:, :visible], atol=1e-10)
            np.testing.assert_allclose(v[:, row, :visible], refs[row][1][:, :visible], atol=1e-10)
    assert emitted == stream.result.tokens == dec.generate(prompts, mode="ar", max_new_tokens=MAX_NEW).tokens
