"""Lossless mode: greedy TiDAR (beta=1, slot0="verifier") emits exactly the greedy AR tokens, in float64.

The trained tiny model accepts multi-token blocks often but not always, so partial blocks, full blocks and
EOS inside an accepted block are all exercised; a random model covers the (nearly always) k=1 regime.
"""

from __future__ import annotations

import contextlib

import jax
import pytest

from test_decode_support import pattern_prompts, random_tiny, trained_decoder
from tidar_jax.attention import pallas_gpu
from tidar_jax.decode import Decoder

MAX_NEW = 24


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _check_equal(dec, prompts, block, eos_token_id=None, max_new=MAX_NEW):
    ar = dec.generate(prompts, mode="ar", max_new_tokens=max_new, eos_token_id=eos_token_id)
    td = dec.generate(prompts, mode="tidar", block_size=block, beta=1.0, slot0="verifier", max_new_tokens=max_new,
                      eos_token_id=eos_token_id)
    assert td.tokens == ar.tokens
    return ar, td


# batch 4 by default (one AR program serves all four block sizes); batches 1-3 run with -m slow.
# "auto" is the blockwise kernel on CPU; the reference kernel is checked once by default.
@pytest.mark.parametrize("block,lengths,attention", [
    (1, [5, 2, 9, 4], "auto"), (2, [3, 9, 1, 6], "auto"), (4, [2, 7, 4, 12], "auto"), (8, [6, 1, 11, 3], "auto"),
    (4, [2, 7, 4, 12], "reference"),
    # the Pallas GPU kernel in the Pallas interpreter (it runs the prefill; decode steps read the cache in pages)
    pytest.param(4, [2, 7, 4, 12], "pallas_gpu", marks=pytest.mark.slow)] + [
    pytest.param(b, ls, "auto", marks=pytest.mark.slow)
    for b, ls in [(1, [5]), (2, [3, 9]), (4, [2, 7, 4]), (8, [13])]])
def test_greedy_tidar_equals_greedy_ar(block, lengths, attention):
    # the default-kernel call shares its cached Decoder (and compiled programs) with the other decode tests
    dec = trained_decoder("float64") if attention == "auto" else trained_decoder("float64", attention)
    prompts = pattern_prompts(lengths, seed=block)
    with pallas_gpu.interpreting() if attention == "pallas_gpu" else contextlib.nullcontext():
        ar, td = _check_equal(dec, prompts, block)
    assert all(len(t) == MAX_NEW for t in td.tokens)  # max_new_tokens is exact
    hist = {int(k): c for k, c in td.stats["accepted_length_hist"].items()}
    if block > 1:
        assert sum(c for k, c in hist.items() if k > 1) > 0, hist  # multi-token blocks were really accepted
    # the step count is consistent with the histogram: every active row-step accepted some k
    assert sum(hist.values()) == sum(n - 1 for n in td.stats["nfe_per_row"])

    # EOS: pick a token that occurs mid-generation in some row, so at least one row stops inside a block
    eos = ar.tokens[0][len(ar.tokens[0]) // 2]
    ar_eos, td_eos = _check_equal(dec, prompts, block, eos_token_id=eos)
    for full, cut in zip(ar.tokens, td_eos.tokens):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert cut == expected


# random models accept almost nothing (k = 1 paths only); the trained model above is the stronger check, so
# these run with -m slow to keep the default suite short
@pytest.mark.slow
@pytest.mark.parametrize("block,lengths", [(8, [9, 2, 5]), (1, [4, 6]), (2, [1]), (4, [3, 12, 7, 2])])
def test_random_model_lossless(block, lengths):
    model = random_tiny("float64", seed=block, scale=3.0, vocab_size=512, mask_token_id=511)
    dec = Decoder.from_model(model)
    prompts = [[(7 * i + 3 * j) % 500 for j in range(n)] for i, n in enumerate(lengths)]
    _check_equal(dec, prompts, block, max_new=16)


def test_diffusion_slot0_differs_only_by_design():
    """slot0="diffusion" (the authors' rule) keeps max_new_tokens exact and the first token is the mask argmax;
    it is not guaranteed to equal AR, so only the invariants are checked."""
    dec = trained_decoder("float64")
    prompts = pattern_prompts([4, 8], seed=3)
    res = dec.generate(prompts, mode="tidar", block_size=4, beta=0.0, slot0="diffusion", max_new_tokens=MAX_NEW)
    assert [len(t) for t in res.tokens] == [MAX_NEW, MAX_NEW]
    assert 1.0 <= res.stats["mean_accepted"] <= 4.0
