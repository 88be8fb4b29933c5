"""TiDAR hybrid attention masks and their position ids, as pure ``jnp`` functions.

Convention everywhere: a boolean mask is ``True`` where the query may attend to the key.
Decode/prefill masks are laid out over keys ``[KV cache slots 0..C-1 | current tokens]`` so the model can
concatenate cached and current keys without reordering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_block(seq_len: int, block_size: int):
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if seq_len % block_size:
        raise ValueError(
            f"seq_len={seq_len} is not a multiple of block_size={block_size}; "
            f"use a sequence length that is (e.g. {seq_len - seq_len % block_size or block_size})")


# --------------------------------------------------------------------------------------------------------------
# Training: [x_0 .. x_{S-1} | MASK x S]
# --------------------------------------------------------------------------------------------------------------

def training_positions(seq_len: int, segment_ids_NS=None):
    """Positions of the doubled sequence: ``0..S-1`` twice (or restarting per document when packed)."""
    if segment_ids_NS is None:
        pos_S = jnp.arange(seq_len, dtype=jnp.int32)
        return jnp.concatenate([pos_S, pos_S])
    seg_NS = jnp.asarray(segment_ids_NS)
    idx_S = jnp.arange(seq_len, dtype=jnp.int32)
    is_start_NS = jnp.concatenate(
        [jnp.ones_like(seg_NS[:, :1], dtype=bool), seg_NS[:, 1:] != seg_NS[:, :-1]], axis=1)
    # index of the most recent document start at or before each token
    start_NS = _cummax(jnp.where(is_start_NS, idx_S, 0))
    pos_NS = idx_S - start_NS
    return jnp.concatenate([pos_NS, pos_NS], axis=1).astype(jnp.int32)


def _cummax(x_NS):
    return jax.lax.cummax(x_NS, axis=1)


def training_mask(seq_len: int, block_size: int, segment_ids_NS=None):
    """Boolean ``[2S, 2S]`` (or ``[N, 2S, 2S]`` with segment ids) mask of the TiDAR training layout.

    clean->clean: causal.  clean->mask: never.  mask block b (indices [bB, (b+1)B) of the mask half):
    its own block bidirectionally and clean tokens with index < bB; never other mask blocks.
    With ``segment_ids_NS`` ([N, S], packed documents) attention is further restricted to the same document.
    """
    _check_block(seq_len, block_size)
    idx_T = jnp.arange(2 * seq_len)
    is_clean_T = idx_T < seq_len
    tok_T = idx_T % seq_len  # index within its half
    blk_T = tok_T // block_size
    q_clean, k_clean = is_clean_T[:, None], is_clean_T[None, :]
    q_tok, k_tok = tok_T[:, None], tok_T[None, :]
    clean_clean = q_clean & k_clean & (k_tok <= q_tok)
    mask_mask = ~q_clean & ~k_clean & (blk_T[:, None] == blk_T[None, :])
    mask_clean = ~q_clean & k_clean & (k_tok < blk_T[:, None] * block_size)
    allow_TT = clean_clean | mask_mask | mask_clean
    if segment_ids_NS is None:
        return allow_TT
    seg_NS = jnp.asarray(segment_ids_NS)
    if seg_NS.ndim != 2 or seg_NS.shape[1] != seq_len:
        raise ValueError(f"segment_ids shape {seg_NS.shape}: expected [N, {seq_len}]")
    seg_NT = jnp.concatenate([seg_NS, seg_NS], axis=1)
    same_NTT = seg_NT[:, :, None] == seg_NT[:, None, :]
    return allow_TT[None] & same_NTT


# --------------------------------------------------------------------------------------------------------------
# Decode step: [d_0 .. d_{B-1} | G_1 (B masks) | ... | G_B (B masks)] against [cache | current]
# --------------------------------------------------------------------------------------------------------------

def decode_layout(block_size: int):
    """Static per-token structure of a decode step: ``(group_Q, slot_Q)``; group 0 is the draft row."""
    q_len = block_size * (block_size + 1)
    idx_Q = jnp.arange(q_len)
    return idx_Q // block_size, idx_Q % block_size


def decode_positions(cache_len_N, block_size: int):
    """Positions ``[N, B(B+1)]``: draft i -> L+i; group j slot t -> L+j+t."""
    group_Q, slot_Q = decode_layout(block_size)
    cache_len_N = jnp.asarray(cache_len_N, dtype=jnp.int32).reshape(-1)
    return (cache_len_N[:, None] + (group_Q + slot_Q)[None, :]).astype(jnp.int32)


def decode_step_mask(block_size: int):
    """Boolean ``[Q, Q]`` mask among the B(B+1) step tokens (independent of the cache)."""
    group_Q, slot_Q = decode_layout(block_size)
    gq, gk = group_Q[:, None], group_Q[None, :]
    sq, sk = slot_Q[:, None], slot_Q[None, :]
    draft_draft = (gq == 0) & (gk == 0) & (sk <= sq)
    group_draft = (gq > 0) & (gk == 0) & (sk < gq)
    group_own = (gq > 0) & (gk == gq)
    return draft_draft | group_draft | group_own


def decode_mask(cache_len_N, block_size: int, cache_size: int):
    """Boolean ``[N, Q, C+Q]`` decode-step mask over keys ``[cache slots 0..C-1 | step tokens]``.

    Every step token sees the committed prefix (cache slots < L of its row); drafts are causal among drafts;
    group j sees drafts 0..j-1 and its own group bidirectionally; nothing else.
    """
    cache_len_N = jnp.asarray(cache_len_N, dtype=jnp.int32).reshape(-1)
    q_len = block_size * (block_size + 1)
    prefix_NC = jnp.arange(cache_size)[None, :] < cache_len_N[:, None]
    prefix_NQC = jnp.broadcast_to(prefix_NC[:, None, :], (cache_len_N.shape[0], q_len, cache_size))
    step_NQQ = jnp.broadcast_to(decode_step_mask(block_size)[None], (cache_len_N.shape[0], q_len, q_len))
    return jnp.concatenate([prefix_NQC, step_NQQ], axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Prefill: [prompt (padded to P) | B masks]
# --------------------------------------------------------------------------------------------------------------

def prefill_positions(prompt_len_N, padded_len: int, block_size: int):
    """Positions ``[N, P+B]``: prompt 0..P-1 (pad slots keep counting), masks L..L+B-1 (L = real length)."""
    prompt_len_N = jnp.asarray(prompt_len_N, dtype=jnp.int32).reshape(-1)
    n = prompt_len_N.shape[0]
    prompt_NP = jnp.broadcast_to(jnp.arange(padded_len, dtype=jnp.int32)[None], (n, padded_len))
    masks_NB = prompt_len_N[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None]
    return jnp.concatenate([prompt_NP, masks_NB], axis=1)


def prefill_mask(prompt_len_N, padded_len: int, block_size: int):
    """Boolean ``[N, P+B, P+B]`` prefill mask: prompt causal over its real tokens (k < L); the B mask tokens
    see the whole real prompt and each other.  Padding queries see only real earlier tokens and themselves, so
    every row has at least one allowed key; their outputs are never used."""
    prompt_len_N = jnp.asarray(prompt_len_N, dtype=jnp.int32).reshape(-1)
    t = padded_len + block_size
    idx_T = jnp.arange(t)
    is_prompt_T = idx_T < padded_len
    q_prompt, k_prompt = is_prompt_T[:, None], is_prompt_T[None, :]
    real_NT = idx_T[None, :] < prompt_len_N[:, None]  # key is a real prompt token
    causal_TT = q_prompt & k_prompt & (idx_T[None, :] <= idx_T[:, None])
    prompt_part_NTT = causal_TT[None] & (real_NT[:, None, :] | (idx_T[:, None] == idx_T[None, :])[None])
    mask_sees_prompt_NTT = (~q_prompt & k_prompt)[None] & real_NT[:, None, :]
    mask_sees_masks_TT = ~q_prompt & ~k_prompt
    return prompt_part_NTT | mask_sees_prompt_NTT | mask_sees_masks_TT[None]
