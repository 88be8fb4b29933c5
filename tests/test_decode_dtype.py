"""Decode dtype chosen once at load: the cast path is exact in float64 (lossless TiDAR == AR, same tokens as a
model built in float64), and with bf16 weights every TiDAR/AR divergence is a verified near-tie of the bf16
model's own logits. The KV-cache dtype is an option."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from test_decode_support import pattern_prompts, plain_forward, trained_decoder, trained_tiny
from tidar_jax.decode import Decoder, DecodeError
from tidar_jax.decode.api import default_dtype

MAX_NEW = 24
PROMPTS = pattern_prompts([5, 2, 9, 12], seed=31)


def test_cast_once_is_exact_in_float64():
    with jax.enable_x64(True):
        dec = Decoder.from_model(trained_tiny("float32"), dtype="float64")
        assert dec.cfg.dtype == dec.cfg.param_dtype == "float64"
        assert {a.dtype for a in jax.tree.leaves(dec.params)} == {jnp.dtype("float64")}
        ar = dec.generate(PROMPTS, mode="ar", max_new_tokens=MAX_NEW)
        td = dec.generate(PROMPTS, mode="tidar", block_size=4, max_new_tokens=MAX_NEW)
        assert td.tokens == ar.tokens == trained_decoder("float64").generate(
            PROMPTS, mode="ar", max_new_tokens=MAX_NEW).tokens


@functools.lru_cache(maxsize=None)
def _bf16():
    return Decoder.from_model(trained_tiny("float32"), dtype="bfloat16")


def _logits_last(dec, rows):
    """Next-token logits of a plain causal forward (no cache) of the bf16 model over each row."""
    logits = np.asarray(plain_forward(dec, rows)[0], np.float64)
    return [logits[i, len(r) - 1] for i, r in enumerate(rows)]


def test_bf16_divergences_are_near_ties():
    dec = _bf16()
    assert {a.dtype for a in jax.tree.leaves(dec.params)} == {jnp.dtype("bfloat16")}
    ar = dec.generate(PROMPTS, mode="ar", max_new_tokens=MAX_NEW).tokens
    td = dec.generate(PROMPTS, mode="tidar", block_size=4, max_new_tokens=MAX_NEW).tokens
    checks = []
    for prompt, a, b in zip(PROMPTS, ar, td):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            checks.append((prompt + a[:first], a[first], b[first]))
    if checks:
        for (_, x, y), logits in zip(checks, _logits_last(dec, [c[0] for c in checks])):
            scale = np.max(np.abs(logits))
            # bf16 keeps 8 mantissa bits: two logits within a few ulps of the largest are a tie at this precision
            assert abs(logits[x] - logits[y]) <= 2 ** -5 * scale, (x, y, logits[x], logits[y])
    assert sum(a == b for a, b in zip(ar, td)) >= len(ar) // 2  # divergences are rare, not systematic


@pytest.mark.slow
def test_cache_dtype_option_and_defaults():
    dec = _bf16()
    stream = dec.stream(PROMPTS[:1], mode="tidar", block_size=4, max_new_tokens=6, cache_dtype="float32")
    for _ in stream:
        assert stream.state.cache.k_LNCKD.dtype == jnp.float32
    assert len(stream.result.tokens[0]) == 6
    cfg = trained_tiny("float32").cfg
    assert default_dtype(cfg, "gpu") == default_dtype(cfg, "tpu") == "bfloat16"
    assert default_dtype(cfg, "cpu") == "float32"
    assert default_dtype(cfg.replace(dtype="bfloat16"), "cpu") == "float32"
    with pytest.raises(DecodeError, match="dtype='int8'"):
        Decoder.from_model(trained_tiny("float32"), dtype="int8")
    with pytest.raises(DecodeError, match="cache_dtype='int4'"):
        dec.generate(PROMPTS[:1], max_new_tokens=4, cache_dtype="int4")
