"""The live-length cache attention kernel equals dense attention over ``[cache | current]`` with the decode mask,
in float64, for lengths at and around page boundaries, pages that do not divide the cache, GQA, and stale
garbage (huge values) in the slots beyond each row's live length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decode_support import pattern_prompts, trained_decoder
from tidar_jax import masks
from tidar_jax.attention.paged import cached_attention
from tidar_jax.attention.reference import attend as dense_attention


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("cache_size,page,lengths", [(30, 8, [0, 30, 7, 24])] + [
    pytest.param(c, p, ls, marks=pytest.mark.slow) for c, p, ls in [(32, 8, [0, 1, 7, 8]), (32, 8, [9, 31, 32, 16]),
                                                                    (5, 8, [5, 0, 2, 4])]])
def test_cached_attention_equals_dense(cache_size, page, lengths):
    block, counts = 2, (1, 2)
    step = masks.decode_attention_layout(jnp.asarray(lengths), block, cache_size, counts=counts)
    local_TT = jnp.asarray(step.local_mask())
    t = local_TT.shape[0]
    n, h, kv, d = len(lengths), 4, 2, 8
    ks = jax.random.split(jax.random.key(cache_size + page), 5)
    q = jax.random.normal(ks[0], (n, t, h, d), jnp.float64)
    k = jax.random.normal(ks[1], (n, t, kv, d), jnp.float64)
    v = jax.random.normal(ks[2], (n, t, kv, d), jnp.float64)
    length_N = jnp.asarray(lengths, jnp.int32)
    live_NC = jnp.arange(cache_size)[None, :] < length_N[:, None]
    garbage = 1e4
    ck = jnp.where(live_NC[..., None, None], jax.random.normal(ks[3], (n, cache_size, kv, d), jnp.float64), garbage)
    cv = jnp.where(live_NC[..., None, None], jax.random.normal(ks[4], (n, cache_size, kv, d), jnp.float64), garbage)
    local_NTT = jnp.broadcast_to(local_TT[None], (n, t, t))
    # the kernel reads pages of layer 1 straight out of the whole [L, N, C, K, D] cache; layer 0 is garbage
    ck_LNCKD = jnp.stack([jnp.full_like(ck, -garbage), ck])
    cv_LNCKD = jnp.stack([jnp.full_like(cv, -garbage), cv])
    got = jax.jit(cached_attention, static_argnames="page")(q, k, v, ck_LNCKD, cv_LNCKD, jnp.int32(1), length_N,
                                                             local_NTT, page=page)
    mask = step.block()
    # reference: dense attention over the concatenation, with the garbage zeroed (0 * 1e4 weights are exact)
    ref = dense_attention(q, jnp.concatenate([jnp.where(live_NC[..., None, None], ck, 0), k], axis=1),
                                jnp.concatenate([jnp.where(live_NC[..., None, None], cv, 0), v], axis=1), mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # default suite: test_decode_groups' cache test decodes over 5-slot pages and checks == AR
def test_paged_decode_is_lossless():
    """TiDAR with paged cache attention over 4-slot pages emits exactly the tokens of AR with the dense path."""
    dec = trained_decoder("float64")
    prompts = pattern_prompts([5, 2, 9, 12], seed=8)
    ar = dec.generate(prompts, mode="ar", max_new_tokens=24, cache_attention="dense")
    td = dec.generate(prompts, mode="tidar", block_size=4, max_new_tokens=24, cache_page=4)
    assert td.tokens == ar.tokens


@pytest.mark.parametrize("counts,kernel", [((1, 3), "blockwise"), pytest.param(None, "reference", marks=pytest.mark.slow)])
def test_attend_with_cache_paged_equals_concatenated(counts, kernel):
    """The attention interface's two cached paths agree: reading the cache in pages (``cache_page > 0``) and
    concatenating layer ``layer`` of the cache with the current keys (attended by ``kernel``)."""
    from tidar_jax import attention

    block, cache_size, n_layers, h, kv, d = 3, 21, 3, 4, 2, 8
    lengths = jnp.asarray([0, 21, 9], jnp.int32)
    dense = masks.decode_attention_layout(lengths, block, cache_size, counts=counts)
    paged = masks.decode_attention_layout(lengths, block, cache_size, counts=counts, cache_page=8)
    t, n = dense.q_len, lengths.shape[0]
    ks = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(ks[0], (n, t, h, d), jnp.float64)
    k = jax.random.normal(ks[1], (n, t, kv, d), jnp.float64)
    v = jax.random.normal(ks[2], (n, t, kv, d), jnp.float64)
    ck = jax.random.normal(ks[3], (n_layers, n, cache_size, kv, d), jnp.float64)
    cv = jax.random.normal(ks[4], (n_layers, n, cache_size, kv, d), jnp.float64)
    layer = jnp.int32(2)
    want = attention.attend_with_cache(q, k, v, ck, cv, layer, dense, kernel)
    got = jax.jit(attention.attend_with_cache, static_argnums=(7,))(q, k, v, ck, cv, layer, paged, kernel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def test_layer_major_params_equal_stacked():
    """The decoder's per-layer param buffers (``to_layer_major``) give the same logits and step K/V as the
    stacked, scanned model, for a cached decode step (paged) and a prefill."""
    from flax import nnx

    from tidar_jax.config import ModelConfig
    from tidar_jax.model import KVCache, init_model, layer_major

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_size=48,
                      mask_token_id=1, block_size=2, dtype="float64", param_dtype="float64")
    graphdef, params = nnx.split(init_model(cfg, seed=4))
    lm = layer_major.to_layer_major(params)
    assert len(lm.layers) == 3 and layer_major.to_layer_major(lm) is lm
    lengths = jnp.asarray([5, 11], jnp.int32)
    step = masks.decode_attention_layout(lengths, 2, 16, cache_page=4)
    ks = jax.random.split(jax.random.key(0), 3)
    shape = (3, 2, 16, 2, 8)
    cache = KVCache(jax.random.normal(ks[0], shape, jnp.float64), jax.random.normal(ks[1], shape, jnp.float64),
                    lengths)
    tokens = jax.random.randint(ks[2], (2, step.q_len), 0, 64)
    prefill = masks.prefill_layout(jnp.asarray([7, 4]), 8, 2)
    ptokens = tokens[:, :1].repeat(10, axis=1)
    for args in [(tokens, step.positions(), step, cache),
                 (ptokens, masks.prefill_positions(jnp.asarray([7, 4]), 8, 2), prefill)]:
        want = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, *args)
        got = jax.jit(lambda p, *a: layer_major.merge(graphdef, p)(*a))(lm, *args)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
