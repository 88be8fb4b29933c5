import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tidar_jax import masks
from reference import decode_mask_ref, prefill_mask_ref, training_mask_ref


@pytest.mark.parametrize("S,B", [(1, 1), (4, 1), (4, 2), (4, 4), (6, 3), (8, 2), (12, 4), (16, 8), (16, 16)])
def test_training_mask_matches_reference(S, B):
    got = np.asarray(masks.training_mask(S, B))
    assert got.shape == (2 * S, 2 * S)
    np.testing.assert_array_equal(got, np.array(training_mask_ref(S, B)))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6).flatmap(lambda B: st.tuples(st.just(B), st.integers(1, 5))),
       st.lists(st.integers(0, 2), min_size=1, max_size=30), st.integers(1, 3))
def test_training_mask_with_segments_matches_reference(b_and_blocks, seg_deltas, n):
    B, nblocks = b_and_blocks
    S = B * nblocks
    rng = np.random.default_rng(len(seg_deltas) * 7 + S)
    # packed documents: monotone segment ids
    segs = np.cumsum(rng.integers(0, 2, size=(n, S)) * (rng.random((n, S)) < 0.3), axis=1)
    got = np.asarray(masks.training_mask(S, B, jnp.asarray(segs)))
    for i in range(n):
        np.testing.assert_array_equal(got[i], np.array(training_mask_ref(S, B, segs[i].tolist())))


def test_training_positions():
    np.testing.assert_array_equal(masks.training_positions(6), [0, 1, 2, 3, 4, 5] * 2)
    segs = jnp.array([[0, 0, 0, 1, 1, 2]])
    np.testing.assert_array_equal(masks.training_positions(6, segs)[0], [0, 1, 2, 0, 1, 0] * 2)


@pytest.mark.parametrize("S,B", [(5, 2), (7, 4), (3, 2)])
def test_training_mask_rejects_non_multiple(S, B):
    with pytest.raises(ValueError, match=f"seq_len={S} is not a multiple of block_size={B}"):
        masks.training_mask(S, B)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(0, 12), st.integers(0, 6))
def test_decode_mask_matches_reference(B, L, extra):
    C = L + extra + 1
    got = np.asarray(masks.decode_mask(jnp.array([L]), B, C))[0]
    ref, ref_pos = decode_mask_ref(L, B, C)
    np.testing.assert_array_equal(got, np.array(ref))
    np.testing.assert_array_equal(np.asarray(masks.decode_positions(jnp.array([L]), B))[0], ref_pos)


def test_decode_mask_per_row_lengths():
    B, C = 3, 10
    lens = jnp.array([0, 4, 9])
    got = np.asarray(masks.decode_mask(lens, B, C))
    for i, L in enumerate([0, 4, 9]):
        np.testing.assert_array_equal(got[i], np.array(decode_mask_ref(L, B, C)[0]))


def test_decode_layout_paper_example():
    # Fig. 3 (B=3, prefix ABC): drafts 3,4,5; G1 = 4,5,6; G2 = 5,6,7; G3 = 6,7,8
    np.testing.assert_array_equal(masks.decode_positions(jnp.array([3]), 3)[0],
                                  [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 10), st.integers(0, 5))
def test_prefill_mask_matches_reference(B, L, pad):
    P = L + pad
    got = np.asarray(masks.prefill_mask(jnp.array([L]), P, B))[0]
    ref, ref_pos = prefill_mask_ref(L, P, B)
    np.testing.assert_array_equal(got, np.array(ref))
    np.testing.assert_array_equal(np.asarray(masks.prefill_positions(jnp.array([L]), P, B))[0], ref_pos)


def test_every_query_has_a_key():
    # no fully-masked rows (they would make softmax meaningless)
    assert np.asarray(masks.training_mask(8, 4)).any(-1).all()
    assert np.asarray(masks.decode_mask(jnp.array([0, 3]), 4, 8)).any(-1).all()
    assert np.asarray(masks.prefill_mask(jnp.array([1, 5]), 8, 4)).any(-1).all()
