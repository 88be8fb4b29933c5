"""The reference kernel: dense GQA attention over a materialised boolean ``[T, S]`` mask. The oracle for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tidar_jax.masks import is_layout


def dense_mask(layout_or_mask):
    """Boolean ``[R, T, S]`` (R = 1 or batch) from a layout, or the given dense mask unchanged."""
    return layout_or_mask.block() if is_layout(layout_or_mask) else layout_or_mask


def attend(q_BTHD, k_BSKD, v_BSKD, layout_or_mask):
    """Softmax(q k^T / sqrt(D)) v with the mask applied; scores and softmax in float32 (at least)."""
    mask_BTS = dense_mask(layout_or_mask)
    b, t, h, d = q_BTHD.shape
    kv = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(b, t, kv, h // kv, d)
    compute = jnp.promote_types(q_BTHD.dtype, jnp.float32)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=compute)
    scores_BKGTS = scores_BKGTS * (d ** -0.5)
    neg = jnp.finfo(compute).min
    scores_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], scores_BKGTS, neg)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKD.dtype)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
    return out_BTKGD.reshape(b, t, h, d)
