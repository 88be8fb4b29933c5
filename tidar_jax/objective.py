"""The TiDAR objective: (alpha * CE_AR + CE_Diff) / (1 + alpha) on the doubled sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tidar_jax.draft_loss import DraftLoss, block_sums, finalize, position_stats


def _masked_mean(values_NS, weights_NS):
    total = jnp.sum(weights_NS)
    return jnp.sum(values_NS * weights_NS) / jnp.maximum(total, 1.0), total


def ar_targets(tokens_NS, loss_mask_NS=None, segment_ids_NS=None):
    """Shifted next-token targets: clean position i predicts x_{i+1}. Returns (labels_NS, weights_NS).

    Position i is valid when tokens i and i+1 are both valid and (when packed) in the same document.
    The last position has no target.
    """
    tokens_NS = jnp.asarray(tokens_NS)
    valid_NS = jnp.ones(tokens_NS.shape, bool) if loss_mask_NS is None else jnp.asarray(loss_mask_NS).astype(bool)
    labels_NS = jnp.concatenate([tokens_NS[:, 1:], tokens_NS[:, -1:]], axis=1)
    nxt_valid = jnp.concatenate([valid_NS[:, 1:], jnp.zeros_like(valid_NS[:, :1])], axis=1)
    weights_NS = valid_NS & nxt_valid
    if segment_ids_NS is not None:
        seg = jnp.asarray(segment_ids_NS)
        same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], dtype=bool)], axis=1)
        weights_NS = weights_NS & same
    return labels_NS, weights_NS.astype(jnp.float32)


def diffusion_targets(tokens_NS, loss_mask_NS=None):
    """Aligned targets: the mask token at position i predicts x_i."""
    tokens_NS = jnp.asarray(tokens_NS)
    valid_NS = jnp.ones(tokens_NS.shape, bool) if loss_mask_NS is None else jnp.asarray(loss_mask_NS).astype(bool)
    return tokens_NS, valid_NS.astype(jnp.float32)


def tidar_loss(logits_N2SV, tokens_NS, loss_mask_NS=None, segment_ids_NS=None, alpha: float = 1.0,
               draft: DraftLoss | None = None, block_size: int | None = None):
    """Loss and metrics for logits over the doubled sequence ``[clean S | mask S]``.

    Each half is a token-mean cross-entropy over its own valid tokens; the total is
    ``(alpha * ar_loss + diff_loss) / (1 + alpha)``. ``draft`` (``tidar_jax.draft_loss.DraftLoss``) replaces
    ``diff_loss`` in the total by the draft objective (position-weighted CE + distillation + chain terms); the
    ``diff_loss`` metric stays the plain diffusion cross-entropy. ``None`` or an inactive ``DraftLoss`` is the
    paper's objective; an active one needs ``block_size``.
    """
    s = tokens_NS.shape[1]
    if logits_N2SV.shape[1] != 2 * s:
        raise ValueError(f"logits length {logits_N2SV.shape[1]} != 2 * tokens length {2 * s}")
    drafting = draft is not None and draft.active
    if drafting and (block_size is None or block_size < 1 or s % block_size):
        raise ValueError(f"draft-loss options need block_size dividing the sequence length {s}, got {block_size}")
    logits_N2SV = logits_N2SV.astype(jnp.promote_types(logits_N2SV.dtype, jnp.float32))
    clean_NSV, mask_NSV = logits_N2SV[:, :s], logits_N2SV[:, s:]
    ar_labels, ar_w = ar_targets(tokens_NS, loss_mask_NS, segment_ids_NS)
    df_labels, df_w = diffusion_targets(tokens_NS, loss_mask_NS)
    ar_ce = optax.softmax_cross_entropy_with_integer_labels(clean_NSV, ar_labels)
    df_ce = optax.softmax_cross_entropy_with_integer_labels(mask_NSV, df_labels)
    ar_loss, ar_count = _masked_mean(ar_ce, ar_w)
    diff_loss, diff_count = _masked_mean(df_ce, df_w)
    ar_acc, _ = _masked_mean((jnp.argmax(clean_NSV, -1) == ar_labels).astype(jnp.float32), ar_w)
    diff_acc, _ = _masked_mean((jnp.argmax(mask_NSV, -1) == df_labels).astype(jnp.float32), df_w)
    metrics = {"ar_loss": ar_loss, "diff_loss": diff_loss, "ar_acc": ar_acc, "diff_acc": diff_acc,
               "ar_tokens": ar_count, "diff_tokens": diff_count}
    draft_term = diff_loss
    if drafting:
        draft_term, draft_metrics = _draft_term(clean_NSV, mask_NSV, df_ce, df_w, ar_w, draft, block_size)
        metrics.update(draft_metrics)
    loss = (alpha * ar_loss + draft_term) / (1.0 + alpha)
    return loss, {"loss": loss, **metrics}


def _draft_term(clean_NSV, mask_NSV, df_ce_NS, df_w_NS, ar_w_NS, draft: DraftLoss, block_size: int):
    """Target-aligned draft objective: the AR logits predicting x_p sit at clean row p-1, the diffusion logits at
    mask row p; target 0 has no AR teacher."""
    stats = position_stats(clean_NSV[:, :-1], mask_NSV[:, 1:], draft)
    stats = {k: jnp.pad(v, ((0, 0), (1, 0))) for k, v in stats.items()}
    teacher_w_NS = jnp.pad(ar_w_NS[:, :-1], ((0, 0), (1, 0)))
    sums = block_sums(df_ce_NS, df_w_NS, stats, teacher_w_NS, block_size, draft)
    return finalize(sums, draft)


def ar_loss(logits_NSV, tokens_NS, loss_mask_NS=None, segment_ids_NS=None):
    """Plain causal-LM loss (the AR-only baseline objective, and AR-mode evaluation)."""
    logits_NSV = logits_NSV.astype(jnp.promote_types(logits_NSV.dtype, jnp.float32))
    labels, w = ar_targets(tokens_NS, loss_mask_NS, segment_ids_NS)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_NSV, labels)
    loss, count = _masked_mean(ce, w)
    acc, _ = _masked_mean((jnp.argmax(logits_NSV, -1) == labels).astype(jnp.float32), w)
    return loss, {"loss": loss, "ar_loss": loss, "ar_acc": acc, "ar_tokens": count}
