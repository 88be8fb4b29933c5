"""TiDAR draft acceptance: greedy matching and exact speculative sampling, both as masked scans.

Indexing convention: ``drafts_NB[:, i]`` is the draft for position L+i, and ``verifier_NBV[:, i]`` is the verifier
distribution for position L+i+1 (AR logits at draft i, optionally mixed with group i+1's first slot). So
``verifier[:, i]`` checks ``drafts[:, i+1]`` for i < B-1, and ``verifier[:, B-1]`` is the bonus position L+B.
Draft 0 is always accepted, so the accepted count k is in [1, B], and the token for position L+k (first
rejection or bonus) comes from ``verifier[:, k-1]``.
"""

from __future__ import annotations

import jax.numpy as jnp

from tidar_jax.decode.sampling import greedy_token, sample_inverse_cdf


def _count_accepted(ok_NJ):
    """1 + length of the leading run of True (the cumulative product)."""
    return 1 + jnp.sum(jnp.cumprod(ok_NJ.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _at(x_NB, k_N):
    return jnp.take_along_axis(x_NB, k_N[:, None], axis=1)[:, 0]


def greedy_accept(drafts_NB, verifier_NBV):
    """``(k_N, token_N)``: accept drafts while they equal the verifier argmax; ``token`` is the verifier argmax at
    position L+k (the correction at the first mismatch, or the bonus token when all B were accepted)."""
    v_NB = greedy_token(verifier_NBV)
    k_N = _count_accepted(v_NB[:, :-1] == drafts_NB[:, 1:])
    return k_N, _at(v_NB, k_N - 1)


def sampled_accept(drafts_NB, probs_NBV, u_accept_NJ, u_token_N):
    """Exact speculative sampling for point-mass drafts.

    Draft i (i >= 1) is accepted with probability p_i(d_i) (``u < p``), scanning left to right. At the first
    rejection, position L+k is sampled from p with the rejected draft's mass removed (the residual
    max(p - q, 0) for q = delta(d)); after B acceptances the bonus position is sampled from p itself.
    ``u_accept_NJ`` has J = B-1 uniforms per row, ``u_token_N`` one.
    """
    b = drafts_NB.shape[1]
    p_draft_NJ = jnp.take_along_axis(probs_NBV[:, :-1], drafts_NB[:, 1:, None], axis=-1)[..., 0]
    k_N = _count_accepted(u_accept_NJ < p_draft_NJ)
    p_NV = jnp.take_along_axis(probs_NBV, (k_N - 1)[:, None, None], axis=1)[:, 0]
    rejected_N = k_N < b
    rejected_draft_N = _at(drafts_NB, jnp.minimum(k_N, b - 1))
    vocab_V = jnp.arange(p_NV.shape[-1])
    residual_NV = jnp.where(rejected_N[:, None] & (vocab_V[None] == rejected_draft_N[:, None]), 0.0, p_NV)
    # a rejection with (numerically) no residual mass left can only come from rounding; fall back to p
    empty_N = jnp.sum(residual_NV, axis=-1) <= 0
    residual_NV = jnp.where(empty_N[:, None], p_NV, residual_NV)
    return k_N, sample_inverse_cdf(residual_NV, u_token_N)
