"""The acceptance rule and the verifier distribution against independent plain-Python references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.decode.acceptance import greedy_accept, sampled_accept
from tidar_jax.decode.sampling import sample_inverse_cdf, verifier_probs


# ---------------------------------------------------------------------------------------------- references

def ref_probs(logits, temperature, top_k, top_p):
    x = [v / temperature for v in logits]
    if top_k and top_k < len(x):
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in x]
    z = sum(e)
    p = [v / z for v in e]
    if top_p < 1.0:
        order = sorted(p, reverse=True)
        mass, threshold = 0.0, order[0]
        for q in order:  # smallest nucleus whose mass reaches top_p
            threshold = q
            mass += q
            if mass >= top_p:
                break
        p = [q if q >= threshold else 0.0 for q in p]
        z = sum(p)
        p = [q / z for q in p]
    return p


def ref_sample(weights, u):
    total = sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc > u * total:
            return i
    return len(weights) - 1


def ref_greedy_accept(drafts, verifier):
    """drafts[i] is for position L+i; verifier[i] predicts position L+i+1."""
    argmax = [max(range(len(v)), key=lambda j: (v[j], -j)) for v in verifier]
    k = 1
    while k < len(drafts) and argmax[k - 1] == drafts[k]:
        k += 1
    return k, argmax[k - 1]


def ref_sampled_accept(drafts, probs, u_accept, u_token):
    k = 1
    while k < len(drafts) and u_accept[k - 1] < probs[k - 1][drafts[k]]:
        k += 1
    p = list(probs[k - 1])
    if k < len(drafts):
        p[drafts[k]] = 0.0  # residual of p against the point-mass draft
        if sum(p) <= 0:
            p = list(probs[k - 1])
    return k, ref_sample(p, u_token)


# ---------------------------------------------------------------------------------------------- tests

@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _agreeing_drafts(rng, verifier_argmax, block):
    """Drafts that agree with the verifier for a random-length prefix, so every k in [1, B] occurs."""
    n = verifier_argmax.shape[0]
    drafts = rng.integers(0, 5, size=(n, block))
    agree = rng.integers(0, block, size=n)
    for r in range(n):
        for i in range(1, block):
            if i <= agree[r]:
                drafts[r, i] = verifier_argmax[r, i - 1]
    return drafts


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_greedy_accept_matches_reference(block):
    rng = np.random.default_rng(block)
    n, v = 64, 5
    verifier = rng.normal(size=(n, block, v)) * 2
    drafts = _agreeing_drafts(rng, verifier.argmax(-1), block)
    k, tok = jax.jit(greedy_accept)(jnp.asarray(drafts), jnp.asarray(verifier))
    seen = set()
    for r in range(n):
        ref_k, ref_tok = ref_greedy_accept(drafts[r].tolist(), verifier[r].tolist())
        assert (int(k[r]), int(tok[r])) == (ref_k, ref_tok), r
        seen.add(ref_k)
    assert seen == set(range(1, block + 1))  # every acceptance length was exercised


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_sampled_accept_matches_reference(block):
    rng = np.random.default_rng(100 + block)
    n, v = 256, 4
    probs = rng.dirichlet(np.full(v, 0.7), size=(n, block))
    drafts = rng.integers(0, v, size=(n, block))
    likely = rng.random((n, block - 1)) < 0.85  # mostly propose the verifier's favourite so long runs occur
    drafts[:, 1:] = np.where(likely, probs[:, :-1].argmax(-1), drafts[:, 1:])
    u_acc = rng.random((n, block - 1))
    u_tok = rng.random(n)
    k, tok = jax.jit(sampled_accept)(jnp.asarray(drafts), jnp.asarray(probs), jnp.asarray(u_acc), jnp.asarray(u_tok))
    seen = set()
    for r in range(n):
        ref = ref_sampled_accept(drafts[r].tolist(), probs[r].tolist(), u_acc[r].tolist(), float(u_tok[r]))
        assert (int(k[r]), int(tok[r])) == ref, r
        seen.add(ref[0])
    assert seen == set(range(1, block + 1))


def test_sampled_accept_never_emits_rejected_draft():
    """On rejection the token comes from the residual, which has no mass on the rejected draft."""
    rng = np.random.default_rng(7)
    n, b, v = 512, 4, 3
    probs = rng.dirichlet(np.ones(v), size=(n, b))
    drafts = rng.integers(0, v, size=(n, b))
    k, tok = sampled_accept(jnp.asarray(drafts), jnp.asarray(probs), jnp.asarray(rng.random((n, b - 1))),
                            jnp.asarray(rng.random(n)))
    k, tok = np.asarray(k), np.asarray(tok)
    rejected = k < b
    assert rejected.any()
    assert not np.any(tok[rejected] == drafts[np.arange(n), np.minimum(k, b - 1)][rejected])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.9, 4, 0.6)])
def test_verifier_probs_matches_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(32, 9)) * 2
    logits[0, :3] = 1.5  # a tie at the top
    got = np.asarray(jax.jit(verifier_probs, static_argnums=(1, 2, 3))(jnp.asarray(logits), temperature, top_k,
                                                                       top_p))
    for r in range(logits.shape[0]):
        np.testing.assert_allclose(got[r], ref_probs(logits[r].tolist(), temperature, top_k, top_p), atol=1e-12)


def test_inverse_cdf_matches_reference_and_skips_zero_weights():
    rng = np.random.default_rng(5)
    w = rng.random((200, 6))
    w[:, 2] = 0.0
    u = rng.random(200)
    got = np.asarray(sample_inverse_cdf(jnp.asarray(w), jnp.asarray(u)))
    assert [ref_sample(w[r].tolist(), float(u[r])) for r in range(200)] == got.tolist()
    assert not np.any(got == 2)
