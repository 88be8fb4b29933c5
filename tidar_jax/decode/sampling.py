"""The verifier distribution (temperature / top-k / top-p) and inverse-CDF sampling, as pure ``jnp`` functions.

Sampling takes explicit uniforms rather than PRNG keys so that the acceptance rule can be checked against an
independent plain-Python reference draw for draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def verifier_probs(logits_XV, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Probabilities after temperature, then top-k, then top-p (nucleus), renormalised.

    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept).
    top-p keeps every token whose probability is >= the smallest probability inside the minimal
    descending-order prefix whose mass reaches ``top_p`` (so ties at the boundary are kept as well).
    """
    x_XV = logits_XV / temperature
    neg_inf = jnp.asarray(-jnp.inf, x_XV.dtype)
    if top_k and top_k < x_XV.shape[-1]:
        kth_X1 = jax.lax.top_k(x_XV, top_k)[0][..., -1:]
        x_XV = jnp.where(x_XV < kth_X1, neg_inf, x_XV)
    probs_XV = jax.nn.softmax(x_XV, axis=-1)
    if top_p < 1.0:
        sorted_XV = -jnp.sort(-probs_XV, axis=-1)
        before_XV = jnp.cumsum(sorted_XV, axis=-1) - sorted_XV  # mass strictly before each sorted entry
        kept_XV = before_XV < top_p  # the first entry is always kept (before == 0)
        threshold_X1 = jnp.min(jnp.where(kept_XV, sorted_XV, jnp.inf), axis=-1, keepdims=True)
        probs_XV = jnp.where(probs_XV >= threshold_X1, probs_XV, 0.0)
        probs_XV = probs_XV / jnp.sum(probs_XV, axis=-1, keepdims=True)
    return probs_XV


def sample_inverse_cdf(weights_XV, u_X):
    """Index drawn from unnormalised non-negative ``weights`` with uniform ``u`` in [0, 1): the first index whose
    cumulative weight exceeds ``u * total``. Zero-weight entries are never chosen."""
    cum_XV = jnp.cumsum(weights_XV, axis=-1)
    target_X1 = (u_X * cum_XV[..., -1])[..., None]
    idx_X = jnp.sum(cum_XV <= target_X1, axis=-1)
    return jnp.minimum(idx_X, weights_XV.shape[-1] - 1).astype(jnp.int32)


def greedy_token(logits_XV):
    return jnp.argmax(logits_XV, axis=-1).astype(jnp.int32)
