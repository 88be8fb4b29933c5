"""Fixed shapes: prompts of different lengths within one bucket reuse one compiled program; bad options fail
with one clear line before anything is compiled."""

from __future__ import annotations

import jax
import pytest

from test_decode_support import pattern_prompts, trained_decoder, random_tiny
from tidar_jax.decode import Decoder, DecodeError, prompt_bucket


def test_twenty_prompt_lengths_in_one_bucket_compile_once():
    dec = trained_decoder("float32")
    backend_compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            backend_compiles.append(duration)

    # warm the program (and the tiny jnp ops around it) on one length of the bucket
    dec.generate(pattern_prompts([40]), mode="tidar", block_size=4, max_new_tokens=8)
    before = dec.compile_count
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = [dec.generate(pattern_prompts([n], seed=n), mode="tidar", block_size=4, max_new_tokens=8)
                for n in range(33, 53)]  # 20 lengths, all in the 64 bucket
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert dec.compile_count == before
    assert backend_compiles == []
    assert all(len(o.tokens[0]) == 8 for o in outs)


def test_prompt_bucket():
    assert [prompt_bucket(n, 10_000) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
    assert prompt_bucket(40, 50) == 50  # capped by the cache room
    assert prompt_bucket(50, 50) == 50


def _dec():
    return Decoder.from_model(random_tiny("float32"), check_block_size=True, max_cache_len=64)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="diffusion"), "mode='diffusion'"),
    (dict(block_size=0, allow_untrained_block_size=True), "block_size=0"),
    (dict(block_size=8), "trained with block size 4"),
    (dict(beta=1.5), "beta=1.5"),
    (dict(slot0="x"), "slot0='x'"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=1.0, slot0="diffusion"), "slot0='diffusion'"),
    (dict(eos_token_id=99), "eos_token_id=99"),
])
def test_bad_options_name_the_value(kwargs, needle):
    with pytest.raises(DecodeError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        _dec().generate([[1, 2]], **kwargs)


@pytest.mark.parametrize("prompts,needle", [
    ([[1] * 60], "too long"), ([[]], "empty"), ([[1, 99]], "token id 99"), ("hello", "no tokenizer")])
def test_bad_prompts(prompts, needle):
    with pytest.raises(DecodeError, match=needle):
        _dec().generate(prompts, max_new_tokens=4)
