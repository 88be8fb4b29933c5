"""Decode-step attention over ``[KV cache | current tokens]`` that reads the cache in place, bounded by the live
length (``DecodeLayout.cache_page > 0``).

Two partial softmaxes merged by log-sum-exp (the "online softmax" of flash attention):
  * the cache part walks fixed-size pages ``0 .. ceil(max(length) / page) - 1`` with a *dynamic* trip count
    (``lax.fori_loop`` with a traced bound lowers to a ``while_loop``), so the work grows with the longest live
    row of the batch, not with the allocated cache size; each page is sliced straight out of the whole
    ``[L, B, C, K, D]`` cache and never copied;
  * the current-token part uses the layout's static mask among the step's own tokens.

A pure function of ``(q, k_new, v_new, whole cache, layer index, layout)``, so it works per layer inside the
``lax.scan`` over layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q_BTHD, k_BTKD, v_BTKD, cache_k_LBCKD, cache_v_LBCKD, layer, length_B, local_mask_BTT,
                     page: int = 128):
    """GQA attention of the current queries over layer ``layer``'s cache slots ``< length`` (per row) and the
    current tokens allowed by ``local_mask`` (True = may attend). Softmax statistics in float32 (at least).

    The cache is the whole ``[L, B, C, K, D]`` buffer and pages are sliced from it directly: slicing the layer
    first would materialise that layer's whole allocated cache (XLA copies a dynamic slice that feeds a loop),
    i.e. copy the entire cache once per step."""
    b, t, h, d = q_BTHD.shape
    kv = k_BTKD.shape[2]
    c = cache_k_LBCKD.shape[2]
    compute = jnp.promote_types(q_BTHD.dtype, jnp.float32)
    q_BTKGD = q_BTHD.reshape(b, t, kv, h // kv, d).astype(compute) * (d ** -0.5)
    page = max(1, min(page, c)) if c else 1
    length_B = length_B.astype(jnp.int32)

    # current tokens first: every query row sees at least one current key (itself), so m is finite afterwards
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD.astype(compute))
    s_BKGTS = jnp.where(local_mask_BTT[:, None, None], s_BKGTS, -jnp.inf)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    l_BKGT = jnp.sum(p_BKGTS, axis=-1)
    acc_BKGTD = jnp.einsum("bkgts,bskd->bkgtd", p_BKGTS, v_BTKD.astype(compute))

    if c:
        live_pages = (jnp.max(length_B) + page - 1) // page

        def one_page(i, carry):
            m_BKGT, l_BKGT, acc_BKGTD = carry
            # the last page may be clamped back to C - page: slots below i*page were already counted
            start = jnp.minimum(i * page, c - page)
            zero = jnp.zeros((), jnp.int32)  # one index dtype (x64 mode would make Python ints int64)
            corner = (jnp.asarray(layer, jnp.int32), zero, start.astype(jnp.int32), zero, zero)
            k_BPKD = jax.lax.dynamic_slice(cache_k_LBCKD, corner, (1, b, page, kv, d))[0].astype(compute)
            v_BPKD = jax.lax.dynamic_slice(cache_v_LBCKD, corner, (1, b, page, kv, d))[0].astype(compute)
            slot_P = start + jnp.arange(page)
            ok_BP = (slot_P[None] >= i * page) & (slot_P[None] < length_B[:, None])
            s_BKGTP = jnp.einsum("btkgd,bpkd->bkgtp", q_BTKGD, k_BPKD)
            s_BKGTP = jnp.where(ok_BP[:, None, None, None], s_BKGTP, -jnp.inf)
            m_new = jnp.maximum(m_BKGT, jnp.max(s_BKGTP, axis=-1))
            alpha = jnp.exp(m_BKGT - m_new)
            p_BKGTP = jnp.exp(s_BKGTP - m_new[..., None])
            # a masked-out value slot may hold anything (stale or rejected K/V): never multiply it by 0
            p_v = jnp.einsum("bkgtp,bpkd->bkgtd", p_BKGTP, jnp.where(ok_BP[:, :, None, None], v_BPKD, 0))
            return m_new, alpha * l_BKGT + jnp.sum(p_BKGTP, axis=-1), alpha[..., None] * acc_BKGTD + p_v

        m_BKGT, l_BKGT, acc_BKGTD = jax.lax.fori_loop(0, live_pages, one_page, (m_BKGT, l_BKGT, acc_BKGTD))

    out_BKGTD = acc_BKGTD / l_BKGT[..., None]
    return jnp.transpose(out_BKGTD, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q_BTHD.dtype)


def attend(q_BTHD, k_BTKD, v_BTKD, cache_k_LBCKD, cache_v_LBCKD, layer, layout):
    """``cached_attention`` for a ``tidar_jax.masks.DecodeLayout`` with ``cache_page > 0``."""
    local_1TT = jnp.asarray(layout.local_mask())[None]
    return cached_attention(q_BTHD, k_BTKD, v_BTKD, cache_k_LBCKD, cache_v_LBCKD, layer, layout.cache_len_N,
                            local_1TT, layout.cache_page)
