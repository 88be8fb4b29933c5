"""Where a TiDAR decode step's next drafts come from, with a chosen set of mask groups.

A step's query tokens are ``[d_0 .. d_{B-1} | G_{k_1} | ... | G_{k_G}]``: the B pending drafts, then one group of
B mask tokens for each covered accepted count ``k`` (``DecodeOptions.group_counts``); their mask and positions are
``tidar_jax.masks.DecodeLayout`` with ``counts``. Group ``k`` assumes that exactly ``d_0..d_{k-1}`` are accepted, so
it is the source of the next drafts when k drafts are accepted; an uncovered k falls back as described below.
"""

from __future__ import annotations

import jax.numpy as jnp


def next_draft_source(accepted_N, block_size: int, counts: tuple[int, ...]):
    """Where the next drafts come from for each row's accepted count k.

    Returns ``(group_N, shift_N)``: ``group`` is the index (1..G) of the nearest covered count j <= k, or 0 when
    none is (the current drafts act as "group 0", j = 0); ``shift = k - j``. Next draft t >= 1 is slot
    ``min(shift + t, B - 1)`` of that source (its prediction for position L+k+t, clamped at the last slot when
    the source does not reach that far); next draft 0 is the verifier token whenever ``shift > 0``.
    """
    counts_G = jnp.asarray(counts, jnp.int32)
    group_N = jnp.sum(counts_G[None, :] <= accepted_N[:, None], axis=1).astype(jnp.int32)
    j_N = jnp.where(group_N > 0, counts_G[jnp.maximum(group_N - 1, 0)], 0)
    return group_N, (accepted_N - j_N).astype(jnp.int32)


def next_drafts(source_NB, shift_N, token_N, verifier_slot0: bool):
    """Next drafts from the chosen source (see ``next_draft_source``): slot t is the source's slot
    ``min(shift + t, B - 1)``; slot 0 is the verifier token when ``shift > 0`` or ``verifier_slot0``."""
    b = source_NB.shape[1]
    slots_NB = jnp.minimum(shift_N[:, None] + jnp.arange(b)[None], b - 1)
    next_NB = jnp.take_along_axis(source_NB, slots_NB, axis=1)
    use_verifier_N = (shift_N > 0) | verifier_slot0
    return next_NB.at[:, 0].set(jnp.where(use_verifier_N, token_N, next_NB[:, 0]))
