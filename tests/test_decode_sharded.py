"""Sharded decode: a ``Decoder`` on a (data, fsdp, tensor) mesh of fake CPU devices emits exactly the tokens of
one device, TiDAR and AR, greedy and sampled at a fixed seed; params follow the rules table and the KV cache is
sharded over batch and kv heads."""

from __future__ import annotations

import functools

import jax
import pytest

from test_decode_support import pattern_prompts, trained_decoder, trained_tiny
from tidar_jax.decode import Decoder
from tidar_jax.sharding import make_mesh

MAX_NEW = 12
PROMPTS = pattern_prompts([5, 2, 9, 12], seed=13)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@functools.lru_cache(maxsize=None)
def _sharded(shape):
    return Decoder.from_model(trained_tiny("float64"), mesh=make_mesh(*shape))


def _run(dec, mode, temperature):
    return dec.generate(PROMPTS, mode=mode, block_size=4, temperature=temperature, top_k=0, seed=7,
                        max_new_tokens=MAX_NEW).tokens


# default suite: each mesh once in TiDAR and once in AR, one greedy and one sampled; the full cross with -m slow
@pytest.mark.parametrize("shape,mode,temperature", [((2, 2, 2), "tidar", 0.0), ((1, 1, 8), "tidar", 1.0)] + [
    pytest.param(s, m, t, marks=pytest.mark.slow) for s, m, t in [
        ((2, 2, 2), "tidar", 1.0), ((2, 2, 2), "ar", 0.0), ((2, 2, 2), "ar", 1.0),
        ((1, 1, 8), "tidar", 0.0), ((1, 1, 8), "ar", 0.0), ((1, 1, 8), "ar", 1.0)]])
def test_sharded_equals_one_device(shape, mode, temperature):
    one = trained_decoder("float64")
    assert _run(_sharded(shape), mode, temperature) == _run(one, mode, temperature)


def test_sharded_stream_cache_layout():
    """The streamed (donated) state keeps the cache sharded over batch (data, fsdp) and kv heads (tensor)."""
    dec = _sharded((2, 2, 2))
    stream = dec.stream(PROMPTS, mode="tidar", block_size=4, max_new_tokens=MAX_NEW)
    specs = []
    for _ in stream:
        specs.append(stream.state.cache.k_LNCKD.sharding.spec)
    assert all(tuple(s)[:4] == (None, ("data", "fsdp"), None, "tensor") for s in specs), specs
    embed = dec.params.rest["embed"]
    embed = embed.get_value() if hasattr(embed, "get_value") else embed
    assert tuple(embed.sharding.spec) == ("tensor", "fsdp")
    # per-layer decode buffers keep the rules' sharding (embed -> fsdp, heads -> tensor) minus the layer axis
    q_proj = dec.params.layers[0]["attn"]["q_proj"]
    q_proj = q_proj.get_value() if hasattr(q_proj, "get_value") else q_proj
    assert tuple(q_proj.sharding.spec)[:2] == ("fsdp", "tensor"), q_proj.sharding.spec
    assert stream.result.tokens == _run(trained_decoder("float64"), "tidar", 0.0)
