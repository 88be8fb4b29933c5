"""Block-sparse flash attention in pure JAX (portable: CPU, GPU, TPU).

The layout's tile schedule (``schedule.py``, numpy at trace time) lists the non-empty (query tile, key tile)
pairs; the kernel scans that flat list once, so empty tiles cost nothing and no q-tile's list is padded to the
longest (which would make the work dense again). Full pairs are scanned without evaluating the mask, partial
pairs evaluate the layout's rule on the tile's indices (``layout.block``), so no ``[T, S]`` array exists.

Forward: online softmax with per-q-tile running max / sum / accumulator (float32 at least) carried through the
scan and updated in place. Backward (``jax.custom_vjp``, FlashAttention-2 style): recomputes each visited tile's
probabilities from the saved log-sum-exp, so memory is O(T x tile) rather than O(T x S).
GQA: queries are grouped ``[K, R]`` against ``K`` key/value heads. Lengths that are not a multiple of the tile
are padded internally (padded keys are never allowed; padded queries are dropped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tidar_jax.attention.schedule import TileSchedule, tile_schedule

TILE_Q = 128
TILE_K = 128


def _take(x, i):
    return lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def _put(x, i, value):
    return lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), i, axis=0)


def _q_tiles(x_NTHD, nq, tq, kv):
    """``[N, T, H, D]`` -> ``[nq, N, tq, K, R, D]`` (zero-padded)."""
    n, t, h, d = x_NTHD.shape
    x = jnp.pad(x_NTHD, ((0, 0), (0, nq * tq - t), (0, 0), (0, 0)))
    return x.reshape(n, nq, tq, kv, h // kv, d).transpose(1, 0, 2, 3, 4, 5)


def _k_tiles(x_NSKD, nk, tk):
    """``[N, S, K, D]`` -> ``[nk, N, tk, K, D]`` (zero-padded)."""
    n, s, kv, d = x_NSKD.shape
    x = jnp.pad(x_NSKD, ((0, 0), (0, nk * tk - s), (0, 0), (0, 0)))
    return x.reshape(n, nk, tk, kv, d).transpose(1, 0, 2, 3, 4)


def _untile_q(x_QNtKGD, t):
    nq, n, tq, kv, g, d = x_QNtKGD.shape
    return x_QNtKGD.transpose(1, 0, 2, 3, 4, 5).reshape(n, nq * tq, kv * g, d)[:, :t]


def _untile_k(x_KNtKD, s):
    nk, n, tk, kv, d = x_KNtKD.shape
    return x_KNtKD.transpose(1, 0, 2, 3, 4).reshape(n, nk * tk, kv, d)[:, :s]


def _tile_allowed(layout, sched: TileSchedule, qi, ki):
    """Boolean ``[N, 1, 1, tq, tk]`` (N or 1) for one tile pair (broadcasts over ``[N, K, R, tq, tk]`` scores)."""
    q_idx = qi * sched.tile_q + jnp.arange(sched.tile_q)
    k_idx = ki * sched.tile_k + jnp.arange(sched.tile_k)
    return layout.block(q_idx, k_idx)[:, None, None]


def _scan_pairs(body, carry, tile_pairs: np.ndarray, masked: bool):
    if len(tile_pairs) == 0:
        return carry
    pairs = jnp.asarray(tile_pairs)
    carry, _ = lax.scan(lambda c, p: (body(c, p[0], p[1], masked), None), carry, pairs)
    return carry


def _forward(q_NTHD, k_NSKD, v_NSKD, layout, sched: TileSchedule):
    """``(out_NTHD, lse [nq, N, K, R, tq])``."""
    n, t, h, d = q_NTHD.shape
    s, kv = k_NSKD.shape[1], k_NSKD.shape[2]
    g = h // kv
    nq, nk, tq, tk = sched.num_q_tiles, sched.num_k_tiles, sched.tile_q, sched.tile_k
    cd = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    neg = jnp.asarray(-0.7 * jnp.finfo(cd).max, cd)
    scale = d ** -0.5
    q_t, k_t, v_t = _q_tiles(q_NTHD, nq, tq, kv), _k_tiles(k_NSKD, nk, tk), _k_tiles(v_NSKD, nk, tk)

    def body(carry, qi, ki, masked):
        m_all, l_all, acc_all = carry
        s_NKRqk = jnp.einsum("nqkrd,nskd->nkrqs", _take(q_t, qi), _take(k_t, ki), preferred_element_type=cd) * scale
        if masked:
            allowed = _tile_allowed(layout, sched, qi, ki)
            s_NKRqk = jnp.where(allowed, s_NKRqk, neg)
        m_old, l_old, acc_old = _take(m_all, qi), _take(l_all, qi), _take(acc_all, qi)
        m_new = jnp.maximum(m_old, s_NKRqk.max(axis=-1))
        p = jnp.exp(s_NKRqk - m_new[..., None])
        if masked:  # a row with nothing allowed yet has m_new == neg; its masked entries must not count as 1
            p = jnp.where(allowed, p, 0.0)
        corr = jnp.exp(m_old - m_new)
        l_new = l_old * corr + p.sum(axis=-1)
        pv = jnp.einsum("nkrqs,nskd->nkrqd", p.astype(v_NSKD.dtype), _take(v_t, ki), preferred_element_type=cd)
        acc_new = acc_old * corr[..., None] + pv
        return _put(m_all, qi, m_new), _put(l_all, qi, l_new), _put(acc_all, qi, acc_new)

    stat_shape = (nq, n, kv, g, tq)
    carry = (jnp.full(stat_shape, neg, cd), jnp.zeros(stat_shape, cd), jnp.zeros(stat_shape + (d,), cd))
    carry = _scan_pairs(body, carry, sched.full_pairs, masked=False)
    m, l, acc = _scan_pairs(body, carry, sched.partial_pairs, masked=True)
    seen = l > 0  # padded query rows see nothing
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # [nq, N, K, R, tq, D]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -neg)  # exp(s - (-neg)) == 0 for unseen rows
    out_NTHD = _untile_q(out.transpose(0, 1, 4, 2, 3, 5), t).astype(q_NTHD.dtype)
    return out_NTHD, lse


def _backward(q_NTHD, k_NSKD, v_NSKD, out_NTHD, lse, dout_NTHD, layout, sched: TileSchedule):
    n, t, h, d = q_NTHD.shape
    s, kv = k_NSKD.shape[1], k_NSKD.shape[2]
    nq, nk, tq, tk = sched.num_q_tiles, sched.num_k_tiles, sched.tile_q, sched.tile_k
    cd = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    scale = d ** -0.5
    q_t, k_t, v_t = _q_tiles(q_NTHD, nq, tq, kv), _k_tiles(k_NSKD, nk, tk), _k_tiles(v_NSKD, nk, tk)
    do_t = _q_tiles(dout_NTHD.astype(q_NTHD.dtype), nq, tq, kv)
    # delta_i = sum_d dO_id O_id: the softmax-Jacobian term, one per query row
    delta = jnp.sum(_q_tiles(out_NTHD, nq, tq, kv).astype(cd) * do_t.astype(cd), axis=-1)  # [nq, N, tq, K, R]
    delta = delta.transpose(0, 1, 3, 4, 2)  # [nq, N, K, R, tq]

    def body(carry, qi, ki, masked):
        dq_all, dk_all, dv_all = carry
        q_i, k_j, v_j, do_i = _take(q_t, qi), _take(k_t, ki), _take(v_t, ki), _take(do_t, qi)
        s_NKRqk = jnp.einsum("nqkrd,nskd->nkrqs", q_i, k_j, preferred_element_type=cd) * scale
        p = jnp.exp(s_NKRqk - _take(lse, qi)[..., None])
        if masked:
            p = jnp.where(_tile_allowed(layout, sched, qi, ki), p, 0.0)
        dv = jnp.einsum("nkrqs,nqkrd->nskd", p.astype(do_i.dtype), do_i, preferred_element_type=cd)
        dp = jnp.einsum("nqkrd,nskd->nkrqs", do_i, v_j, preferred_element_type=cd)
        ds = p * (dp - _take(delta, qi)[..., None]) * scale
        dq = jnp.einsum("nkrqs,nskd->nqkrd", ds.astype(k_j.dtype), k_j, preferred_element_type=cd)
        dk = jnp.einsum("nkrqs,nqkrd->nskd", ds.astype(q_i.dtype), q_i, preferred_element_type=cd)
        return (_put(dq_all, qi, _take(dq_all, qi) + dq), _put(dk_all, ki, _take(dk_all, ki) + dk),
                _put(dv_all, ki, _take(dv_all, ki) + dv))

    carry = (jnp.zeros(q_t.shape, cd), jnp.zeros(k_t.shape, cd), jnp.zeros(v_t.shape, cd))
    carry = _scan_pairs(body, carry, sched.full_pairs, masked=False)
    dq_t, dk_t, dv_t = _scan_pairs(body, carry, sched.partial_pairs, masked=True)
    return (_untile_q(dq_t, t).astype(q_NTHD.dtype), _untile_k(dk_t, s).astype(k_NSKD.dtype),
            _untile_k(dv_t, s).astype(v_NSKD.dtype))


def _flash(treedef, sched: TileSchedule):
    """A custom-VJP attention for one layout structure and schedule; the layout's arrays are explicit inputs."""

    @jax.custom_vjp
    def flash(q, k, v, *leaves):
        return _forward(q, k, v, jax.tree.unflatten(treedef, leaves), sched)[0]

    def fwd(q, k, v, *leaves):
        out, lse = _forward(q, k, v, jax.tree.unflatten(treedef, leaves), sched)
        return out, (q, k, v, out, lse, leaves)

    def bwd(res, dout):
        q, k, v, out, lse, leaves = res
        dq, dk, dv = _backward(q, k, v, out, lse, dout, jax.tree.unflatten(treedef, leaves), sched)
        return (dq, dk, dv) + (None,) * len(leaves)

    flash.defvjp(fwd, bwd)
    return flash


def schedule_for(layout, t: int, s: int, tile_q: int | None = None, tile_k: int | None = None) -> TileSchedule:
    """The tile schedule ``attend`` uses for ``layout`` (tiles clamped to the lengths; None: ``TILE_Q/TILE_K``,
    read at trace time so a benchmark can sweep them)."""
    return tile_schedule(layout, min(tile_q or TILE_Q, t), min(tile_k or TILE_K, s))


def attend(q_NTHD, k_NSKD, v_NSKD, layout, *, tile_q: int | None = None, tile_k: int | None = None):
    """Attention of ``q [N, T, H, D]`` over ``k, v [N, S, K, D]`` under ``layout`` (a ``tidar_jax.masks`` layout)."""
    t, s = q_NTHD.shape[1], k_NSKD.shape[1]
    if (layout.q_len, layout.k_len) != (t, s):
        raise ValueError(f"layout {type(layout).__name__} is {layout.q_len} queries x {layout.k_len} keys; "
                         f"got q length {t} and k length {s}")
    if q_NTHD.shape[2] % k_NSKD.shape[2]:
        raise ValueError(f"{q_NTHD.shape[2]} query heads: must be a multiple of {k_NSKD.shape[2]} kv heads")
    sched = schedule_for(layout, t, s, tile_q, tile_k)
    leaves, treedef = jax.tree.flatten(layout)
    return _flash(treedef, sched)(q_NTHD, k_NSKD, v_NSKD, *leaves)
