"""Exact speculative sampling: TiDAR's sampled tokens follow the AR sampling distribution.

The reference is the exact AR distribution of the first three generated tokens, computed by plain causal
forwards (no cache) over every prefix; TiDAR's empirical counts (4000 independent rows, fixed seed) are compared
with a chi-square goodness-of-fit test. A control shows the test rejects a slightly wrong distribution.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from test_decode_support import random_tiny
from tidar_jax import masks
from tidar_jax.decode import Decoder
from tidar_jax.decode.sampling import verifier_probs
from tidar_jax.model import causal_mask

PROMPT = [3, 5, 7, 2]
ROWS = 4000
V = 16


def exact_ar_distribution(model, temperature, top_k, top_p):
    """(p(t1, t2) [V, V], p(t3) [V]) of AR sampling after PROMPT, by brute-force causal forwards."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def last_probs(params_, toks):
        n, t = toks.shape
        logits, _ = nnx.merge(graphdef, params_)(toks, jnp.broadcast_to(jnp.arange(t), (n, t)), causal_mask(n, t))
        return verifier_probs(logits[:, -1], temperature, top_k, top_p)

    def next_probs(prefixes):
        return np.asarray(last_probs(params, jnp.asarray(prefixes, jnp.int32)), np.float64)

    p1 = next_probs([PROMPT])[0]
    p2 = next_probs([PROMPT + [a] for a in range(V)])  # [t1, t2]
    joint12 = p1[:, None] * p2
    p3 = next_probs([PROMPT + [a, b] for a, b in itertools.product(range(V), range(V))]).reshape(V, V, V)
    marginal3 = np.einsum("ab,abc->c", joint12, p3)
    return joint12, marginal3


def no_residual_joint(model, joint12, temperature, top_k, top_p):
    """p(t1, t2) if a rejected draft d_1 were followed by a plain sample from p: p2'(x) = p2(d)[x=d] + (1-p2(d)) p2(x).
    d_1 is the prefill's mask-slot-1 argmax, computed here independently with the prefill mask."""
    b, n = 4, len(PROMPT)
    toks = jnp.asarray([PROMPT + [model.cfg.mask_token_id] * b], jnp.int32)
    graphdef, params = nnx.split(model)
    lens = jnp.asarray([n])
    logits, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, masks.prefill_positions(lens, n, b),
                                                            masks.prefill_mask(lens, n, b)))(params, toks)
    d1 = int(jnp.argmax(logits[0, n + 1]))
    p1 = joint12.sum(axis=1)
    p2 = np.divide(joint12, p1[:, None], out=np.zeros_like(joint12), where=p1[:, None] > 0)  # p1=0: top-k cut
    wrong2 = (1 - p2[:, d1:d1 + 1]) * p2
    wrong2[:, d1] += p2[:, d1]
    return p1[:, None] * wrong2


def chi_square_pvalue(counts, probs, min_expected=5.0):
    """Goodness of fit; cells with small expectation are pooled into one so the chi-square law holds."""
    counts, expected = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel() * np.sum(counts)
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert np.all(obs[~keep] == 0), "observed a token of probability zero"
    exp = exp[keep] * obs[keep].sum() / exp[keep].sum()  # remove float32 rounding of the reference's total
    return sps.chisquare(obs[keep], exp).pvalue


def empirical(tokens):
    arr = np.asarray(tokens)
    joint = np.zeros((V, V))
    np.add.at(joint, (arr[:, 0], arr[:, 1]), 1)
    return joint, np.bincount(arr[:, 2], minlength=V)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), pytest.param(0.8, 6, 0.9, marks=pytest.mark.slow)])
def test_tidar_sampling_matches_ar_distribution(temperature, top_k, top_p):
    model = random_tiny("float32", seed=11, scale=4.0)
    joint_ref, third_ref = exact_ar_distribution(model, temperature, top_k, top_p)
    dec = Decoder.from_model(model)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=3, seed=1234)
    tidar = dec.generate([PROMPT] * ROWS, mode="tidar", block_size=4, **kwargs)
    hist = {int(k): c for k, c in tidar.stats["accepted_length_hist"].items()}
    # the drafts are really accepted sometimes and rejected sometimes, so both branches are sampled
    assert hist[1] > 0.05 * ROWS and sum(c for k, c in hist.items() if k > 1) > 0.05 * ROWS, hist
    joint, third = empirical(tidar.tokens)
    print("hist", hist, "p-values", chi_square_pvalue(joint, joint_ref), chi_square_pvalue(third, third_ref))
    assert chi_square_pvalue(joint, joint_ref) > 1e-3
    assert chi_square_pvalue(third, third_ref) > 1e-3

    ar = dec.generate([PROMPT] * ROWS, mode="ar", **kwargs)
    ar_joint, ar_third = empirical(ar.tokens)
    assert chi_square_pvalue(ar_joint, joint_ref) > 1e-3
    assert chi_square_pvalue(ar_third, third_ref) > 1e-3

    # power control: the same counts clearly reject the distribution of the classic bug (on rejection, resample
    # from p instead of the residual), which over-weights the draft d_1 at the second token
    wrong_joint = no_residual_joint(model, joint_ref, temperature, top_k, top_p)
    assert chi_square_pvalue(joint, wrong_joint) < 1e-6
