"""Parity with Hugging Face transformers: random tiny Qwen2/Qwen3/Llama models (GQA, tied and untied), their
weights mapped through the one key table into our model, give the same logits (fp32, atol 1e-4) for a plain
causal forward and for the TiDAR layouts (training, prefill, decode step over a KV cache) given the same 4-D
mask and position ids (additive float mask under eager)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from test_hf_support import FAMILY_CASES, MASK_ID, VOCAB, hf_logits, hf_model, our_logits
from tidar_jax import masks
from tidar_jax.hf import hf_config_to_model_config, params_from_tensors
from tidar_jax.model import KVCache, apply, causal_mask

ATOL = 1e-4


def ours_from_hf(model, block_size=4):
    cfg = hf_config_to_model_config(model.config.to_dict(), mask_token_id=MASK_ID, block_size=block_size,
                                    dtype="float32")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    graphdef, state = params_from_tensors(cfg, sd.__getitem__)
    return cfg, graphdef, state


_PAIRS = {}


def _pair(family, tied):
    if (family, tied) not in _PAIRS:
        model = hf_model(family, tied, seed=FAMILY_CASES.index((family, tied)))
        _PAIRS[family, tied] = model, ours_from_hf(model)
    return _PAIRS[family, tied]


def _ids(cases):
    return [f"{f}-{'tied' if t else 'untied'}" for f, t in cases]


@pytest.fixture(params=FAMILY_CASES, ids=_ids(FAMILY_CASES))
def pair(request):
    """Every family, tied and untied."""
    return _pair(*request.param)


# the TiDAR layouts exercise masks/positions, not the head: each family once, both head kinds covered
LAYOUT_CASES = [("qwen2", False), ("qwen3", True), ("llama", False)]


@pytest.fixture(params=LAYOUT_CASES, ids=_ids(LAYOUT_CASES))
def layout_pair(request):
    return _pair(*request.param)


def test_config_flags_follow_family(pair):
    model, (cfg, _, _) = pair
    family = cfg.family
    assert (cfg.qkv_bias, cfg.qk_norm) == (family == "qwen2", family == "qwen3")
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert cfg.num_kv_heads < cfg.num_heads  # GQA exercised
    assert cfg.head_dim == (12 if family == "qwen3" else cfg.hidden_size // cfg.num_heads)


def test_causal_logits_match(pair):
    model, (cfg, graphdef, state) = pair
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 11))
    ref = hf_logits(model, tokens)
    got = our_logits(cfg, state, tokens, graphdef=graphdef)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # the comparison is sensitive: different inputs give clearly different logits
    assert np.abs(ref - hf_logits(model, tokens[:, ::-1].copy())).max() > 100 * ATOL


def test_training_layout_matches(layout_pair):
    """[x | MASK x S] with the TiDAR hybrid mask and repeated positions, one packed row with two documents."""
    model, (cfg, graphdef, state) = layout_pair
    s, b = 8, 4
    rng = np.random.RandomState(2)
    tokens_NS = rng.randint(0, VOCAB, (2, s))
    seg_NS = np.array([[0] * s, [0] * 5 + [1] * 3])
    full_N2S = np.concatenate([tokens_NS, np.full_like(tokens_NS, MASK_ID)], axis=1)
    mask_N2S2S = np.asarray(masks.training_mask(s, b, seg_NS))
    pos_N2S = np.asarray(masks.training_positions(s, seg_NS))
    ref = hf_logits(model, full_N2S, pos_N2S, mask_N2S2S)
    got = our_logits(cfg, state, full_N2S, pos_N2S, mask_N2S2S, graphdef=graphdef)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["blockwise", "pallas_gpu"])
def test_training_layout_matches_with_layout_kernels(layout_pair, kernel):
    """The same packed training layout passed as a layout object to the blockwise kernel (and to the Pallas GPU
    kernel, in the Pallas interpreter) matches HF too."""
    import contextlib

    from tidar_jax.attention import pallas_gpu
    from tidar_jax.model import abstract_model

    model, (cfg, _, state) = layout_pair
    if kernel == "pallas_gpu" and cfg.family != "qwen3":
        pytest.skip("pallas_gpu (interpreted, ~5 s) on one family: the kernel does not depend on the family")
    s, b = 8, 4
    rng = np.random.RandomState(2)
    tokens_NS = rng.randint(0, VOCAB, (2, s))
    seg_NS = np.array([[0] * s, [0] * 5 + [1] * 3])
    full_N2S = np.concatenate([tokens_NS, np.full_like(tokens_NS, MASK_ID)], axis=1)
    pos_N2S = np.asarray(masks.training_positions(s, seg_NS))
    ref = hf_logits(model, full_N2S, pos_N2S, np.asarray(masks.training_mask(s, b, seg_NS)))
    graphdef_k, _ = abstract_model(cfg.replace(attention=kernel))
    with pallas_gpu.interpreting() if kernel == "pallas_gpu" else contextlib.nullcontext():
        got = our_logits(cfg, state, full_N2S, pos_N2S, masks.training_layout(s, b, seg_NS), graphdef=graphdef_k)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_prefill_layout_matches(layout_pair):
    """[prompt padded to P | B masks], rows with different real prompt lengths: every used position matches."""
    model, (cfg, graphdef, state) = layout_pair
    p, b = 7, 3
    lens = np.array([7, 4])
    tokens = np.random.RandomState(3).randint(0, VOCAB, (2, p + b))
    tokens[:, p:] = MASK_ID
    mask = np.asarray(masks.prefill_mask(lens, p, b))
    pos = np.asarray(masks.prefill_positions(lens, p, b))
    ref = hf_logits(model, tokens, pos, mask)
    got = our_logits(cfg, state, tokens, pos, mask, graphdef=graphdef)
    for row, length in enumerate(lens):
        used = list(range(length)) + list(range(p, p + b))
        np.testing.assert_allclose(got[row, used], ref[row, used], atol=ATOL, rtol=0)


def test_decode_step_over_cache_matches(layout_pair):
    """Prefix in our KV cache + one decode step ([drafts | B mask groups]) == HF over [prefix | step] at once."""
    model, (cfg, graphdef, state) = layout_pair
    prefix_len, b, cache_size = 6, 3, 10
    q = b * (b + 1)
    rng = np.random.RandomState(4)
    prefix = rng.randint(0, VOCAB, (1, prefix_len))
    step = np.full((1, q), MASK_ID)
    step[0, :b] = rng.randint(0, VOCAB, b)
    # our side: causal prefix, commit its K/V into cache slots 0..L-1, then the step against [cache | step]
    _, kv = apply(graphdef, state, jnp.asarray(prefix), jnp.arange(prefix_len)[None], causal_mask(1, prefix_len))
    cache = KVCache.empty(cfg, 1, cache_size)
    cache = KVCache(cache.k_LNCKD.at[:, :, :prefix_len].set(kv.k_LNTKD),
                    cache.v_LNCKD.at[:, :, :prefix_len].set(kv.v_LNTKD), jnp.array([prefix_len], jnp.int32))
    lens = np.array([prefix_len])
    got, _ = apply(graphdef, state, jnp.asarray(step), masks.decode_positions(lens, b),
                   masks.decode_mask(lens, b, cache_size), cache)
    # HF side: one forward over [prefix | step] with the equivalent mask
    t = prefix_len + q
    full_mask = np.zeros((1, t, t), bool)
    full_mask[0, :prefix_len, :prefix_len] = np.tril(np.ones((prefix_len, prefix_len), bool))
    full_mask[0, prefix_len:, :prefix_len] = True
    full_mask[0, prefix_len:, prefix_len:] = np.asarray(masks.decode_step_mask(b))
    pos = np.concatenate([np.arange(prefix_len)[None], np.asarray(masks.decode_positions(lens, b))], axis=1)
    ref = hf_logits(model, np.concatenate([prefix, step], axis=1), pos, full_mask)
    np.testing.assert_allclose(np.asarray(got), ref[:, prefix_len:], atol=ATOL, rtol=0)
