"""The reference kernel: dense GQA attention over a materialised boolean ``[T, S]`` mask. The oracle for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tidar_jax.masks import is_layout


def dense_mask(layout_or_mask):
    """Boolean ``[N, T, S]`` (leading axis N, or 1 for a static layout) from a layout, or the given dense mask unchanged."""
    return layout_or_mask.block() if is_layout(layout_or_mask) else layout_or_mask


def attend(q_NTHD, k_NSKD, v_NSKD, layout_or_mask):
    """Softmax(q k^T / sqrt(D)) v with the mask applied; scores and softmax in float32 (at least)."""
    mask_NTS = dense_mask(layout_or_mask)
    n, t, h, d = q_NTHD.shape
    kv = k_NSKD.shape[2]
    q_NTKRD = q_NTHD.reshape(n, t, kv, h // kv, d)
    compute = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    scores_NKRTS = jnp.einsum("ntkrd,nskd->nkrts", q_NTKRD, k_NSKD, preferred_element_type=compute)
    scores_NKRTS = scores_NKRTS * (d ** -0.5)
    neg = jnp.finfo(compute).min
    scores_NKRTS = jnp.where(mask_NTS[:, None, None, :, :], scores_NKRTS, neg)
    probs_NKRTS = jax.nn.softmax(scores_NKRTS, axis=-1).astype(v_NSKD.dtype)
    out_NTKRD = jnp.einsum("nkrts,nskd->ntkrd", probs_NKRTS, v_NSKD)
    return out_NTKRD.reshape(n, t, h, d)
