"""Inputs and gradients shared by the attention-kernel equality tests (every kernel against ``reference``)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(layout, n, dtype, seed, heads, kv_heads, d):
    """``q, k, v`` for ``layout`` and a random float32 cotangent ``w`` shaped like the output."""
    rng = np.random.default_rng(seed)
    shape_q, shape_k = (n, layout.q_len, heads, d), (n, layout.k_len, kv_heads, d)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_k, shape_k))
    w = jnp.asarray(rng.normal(size=shape_q), jnp.float32)
    return q, k, v, w


def value_and_grads(kernel, layout, q, k, v, w):
    """``(out, (dq, dk, dv))`` of ``sum(out * w)``, one compile."""
    def loss(q, k, v, lay):
        out = kernel(q, k, v, lay)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, layout)
    return out, grads


def random_segments(n, s, seed):
    """Packed-document segment ids ``[n, s]``: a new document starts with probability 0.2 at each position."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.cumsum(rng.random((n, s)) < 0.2, axis=1), jnp.int32)


def assert_close(got, want, tol, relative_grad_atol=True):
    """``got`` and ``want`` (each ``(out, grads)``): outputs within ``tol`` (rtol and atol), gradients within rtol
    ``tol`` and atol ``tol``, times the reference gradient's largest magnitude when ``relative_grad_atol``."""
    out, grads = got
    out_ref, grads_ref = want
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=tol, atol=tol)
    for a, b in zip(grads, grads_ref):
        atol = tol * float(jnp.max(jnp.abs(b))) if relative_grad_atol else tol
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=atol)
