"""Decode-step attention over ``[KV cache | current tokens]`` that reads the cache in place, bounded by the live
length (``DecodeLayout.cache_page > 0``).

Two partial softmaxes merged by log-sum-exp (the "online softmax" of flash attention):
  * the cache part walks fixed-size pages ``0 .. ceil(max(length) / page) - 1`` with a *dynamic* trip count
    (``lax.fori_loop`` with a traced bound lowers to a ``while_loop``), so the work grows with the longest live
    row of the batch, not with the allocated cache size; each page is sliced straight out of the whole
    ``[L, N, C, K, D]`` cache and never copied;
  * the current-token part uses the layout's static mask among the step's own tokens.

A pure function of ``(q, k_new, v_new, whole cache, layer index, layout)``, so it works per layer inside the
``lax.scan`` over layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N, local_mask_NTT,
                     page: int = 128):
    """GQA attention of the current queries over layer ``layer``'s cache slots ``< length`` (per row) and the
    current tokens allowed by ``local_mask`` (True = may attend). Softmax statistics in float32 (at least).

    The cache is the whole ``[L, N, C, K, D]`` buffer and pages are sliced from it directly: slicing the layer
    first would materialise that layer's whole allocated cache (XLA copies a dynamic slice that feeds a loop),
    i.e. copy the entire cache once per step."""
    n, t, h, d = q_NTHD.shape
    kv = k_NTKD.shape[2]
    c = cache_k_LNCKD.shape[2]
    compute = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    q_NTKRD = q_NTHD.reshape(n, t, kv, h // kv, d).astype(compute) * (d ** -0.5)
    page = max(1, min(page, c)) if c else 1
    length_N = length_N.astype(jnp.int32)

    # current tokens first: every query row sees at least one current key (itself), so m is finite afterwards
    s_NKRTS = jnp.einsum("ntkrd,nskd->nkrts", q_NTKRD, k_NTKD.astype(compute))
    s_NKRTS = jnp.where(local_mask_NTT[:, None, None], s_NKRTS, -jnp.inf)
    m_NKRT = jnp.max(s_NKRTS, axis=-1)
    p_NKRTS = jnp.exp(s_NKRTS - m_NKRT[..., None])
    l_NKRT = jnp.sum(p_NKRTS, axis=-1)
    acc_NKRTD = jnp.einsum("nkrts,nskd->nkrtd", p_NKRTS, v_NTKD.astype(compute))

    if c:
        live_pages = (jnp.max(length_N) + page - 1) // page

        def one_page(i, carry):
            m_NKRT, l_NKRT, acc_NKRTD = carry
            # the last page may be clamped back to C - page: slots below i*page were already counted
            start = jnp.minimum(i * page, c - page)
            zero = jnp.zeros((), jnp.int32)  # one index dtype (x64 mode would make Python ints int64)
            corner = (jnp.asarray(layer, jnp.int32), zero, start.astype(jnp.int32), zero, zero)
            k_NYKD = jax.lax.dynamic_slice(cache_k_LNCKD, corner, (1, n, page, kv, d))[0].astype(compute)
            v_NYKD = jax.lax.dynamic_slice(cache_v_LNCKD, corner, (1, n, page, kv, d))[0].astype(compute)
            slot_Y = start + jnp.arange(page)
            ok_NY = (slot_Y[None] >= i * page) & (slot_Y[None] < length_N[:, None])
            s_NKRTY = jnp.einsum("ntkrd,nykd->nkrty", q_NTKRD, k_NYKD)
            s_NKRTY = jnp.where(ok_NY[:, None, None, None], s_NKRTY, -jnp.inf)
            m_new = jnp.maximum(m_NKRT, jnp.max(s_NKRTY, axis=-1))
            alpha = jnp.exp(m_NKRT - m_new)
            p_NKRTY = jnp.exp(s_NKRTY - m_new[..., None])
            # a masked-out value slot may hold anything (stale or rejected K/V): never multiply it by 0
            p_v = jnp.einsum("nkrty,nykd->nkrtd", p_NKRTY, jnp.where(ok_NY[:, :, None, None], v_NYKD, 0))
            return m_new, alpha * l_NKRT + jnp.sum(p_NKRTY, axis=-1), alpha[..., None] * acc_NKRTD + p_v

        m_NKRT, l_NKRT, acc_NKRTD = jax.lax.fori_loop(0, live_pages, one_page, (m_NKRT, l_NKRT, acc_NKRTD))

    out_NKRTD = acc_NKRTD / l_NKRT[..., None]
    return jnp.transpose(out_NKRTD, (0, 3, 1, 2, 4)).reshape(n, t, h, d).astype(q_NTHD.dtype)


def attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout):
    """``cached_attention`` for a ``tidar_jax.masks.DecodeLayout`` with ``cache_page > 0``."""
    local_1TT = jnp.asarray(layout.local_mask())[None]
    return cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout.cache_len_N,
                            local_1TT, layout.cache_page)
