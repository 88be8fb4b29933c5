"""The token layout of a TiDAR decode step with a chosen set of mask groups.

A step's query tokens are ``[d_0 .. d_{B-1} | G_{k_1} | ... | G_{k_G}]``: the B pending drafts, then one group of
B mask tokens for each covered accepted count ``k`` (``DecodeOptions.group_counts``). Group ``k`` assumes that
exactly ``d_0..d_{k-1}`` are accepted: its slot t sits at position L+k+t, sees the committed prefix, drafts
``d_0..d_{k-1}`` and its own group (bidirectionally). With every count covered (``k = 1..B``) this is exactly
``tidar_jax.masks.decode_mask`` / ``decode_positions`` (a test checks it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def step_structure(block_size: int, counts: tuple[int, ...]):
    """Static numpy ``(offset_Q, slot_Q, group_Q)``: position offset from L, slot within its row/group, and the
    group index (0 = draft row, g = the g-th covered group)."""
    b = block_size
    offset = [0] * b + [k for k in counts for _ in range(b)]
    slot = list(range(b)) * (len(counts) + 1)
    group = [g for g in range(len(counts) + 1) for _ in range(b)]
    slot_Q = np.asarray(slot, np.int32)
    return np.asarray(offset, np.int32) + slot_Q, slot_Q, np.asarray(group, np.int32)


def group_count_Q(block_size: int, counts: tuple[int, ...]):
    """Per query token: how many drafts it sees (0 for draft rows: they are causal among drafts instead)."""
    return np.asarray([0] * block_size + [k for k in counts for _ in range(block_size)], np.int32)


def step_positions(length_N, block_size: int, counts: tuple[int, ...]):
    offset_Q, _, _ = step_structure(block_size, counts)
    return (jnp.asarray(length_N, jnp.int32)[:, None] + jnp.asarray(offset_Q)[None]).astype(jnp.int32)


def step_local_mask(block_size: int, counts: tuple[int, ...]):
    """Boolean numpy ``[Q, Q]`` among the step tokens (independent of the cache)."""
    _, slot_Q, group_Q = step_structure(block_size, counts)
    sees_Q = group_count_Q(block_size, counts)
    gq, gk = group_Q[:, None], group_Q[None, :]
    sq, sk = slot_Q[:, None], slot_Q[None, :]
    draft_draft = (gq == 0) & (gk == 0) & (sk <= sq)
    group_draft = (gq > 0) & (gk == 0) & (sk < sees_Q[:, None])
    group_own = (gq > 0) & (gk == gq)
    return draft_draft | group_draft | group_own


def step_mask(length_N, block_size: int, counts: tuple[int, ...], cache_size: int):
    """Boolean ``[N, Q, C+Q]`` over keys ``[cache slots 0..C-1 | step tokens]``."""
    length_N = jnp.asarray(length_N, jnp.int32).reshape(-1)
    local_QQ = jnp.asarray(step_local_mask(block_size, counts))
    n, q = length_N.shape[0], local_QQ.shape[0]
    prefix_NQC = jnp.broadcast_to((jnp.arange(cache_size)[None, :] < length_N[:, None])[:, None, :],
                                  (n, q, cache_size))
    return jnp.concatenate([prefix_NQC, jnp.broadcast_to(local_QQ[None], (n, q, q))], axis=-1)


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
