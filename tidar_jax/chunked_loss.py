"""Cross-entropy over chunks of target positions, so ``[positions, vocab]`` logits never exist all at once.

Target-aligned form (the shared contract): for target position p (the token x_p), the AR logits come from clean
row p-1 and the diffusion logits from mask row p. Each chunk of target positions (aligned to block boundaries)
yields *per-position statistics* (cross-entropy, correctness, weight); they are combined into the loss and
metrics afterwards, so further per-position terms (e.g. draft losses) can be added chunk by chunk. The chunk
body is rematerialised: its logits are recomputed in the backward pass instead of being kept.

Values equal ``tidar_jax.objective.tidar_loss`` / ``ar_loss`` on the full logits (same weights: loss masks and
segment ids), up to float summation order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tidar_jax.objective import ar_targets, diffusion_targets
from tidar_jax.scan_options import scan_unroll


def shift_to_targets(values_NS, fill):
    """Row p-1's value at position p (position 0 gets ``fill``): AR statistics indexed by their target."""
    return jnp.concatenate([jnp.full_like(values_NS[:, :1], fill), values_NS[:, :-1]], axis=1)


def ar_target_weights(tokens_NS, loss_mask_NS=None, segment_ids_NS=None):
    """Weight of target p for the AR loss (x_p predicted from clean row p-1); position 0 has none."""
    _, weights_NS = ar_targets(tokens_NS, loss_mask_NS, segment_ids_NS)  # indexed by source row
    return shift_to_targets(weights_NS, 0.0)


def _chunk_major(x_NS_, chunk: int):
    n, s = x_NS_.shape[:2]
    return jnp.swapaxes(x_NS_.reshape(n, s // chunk, chunk, *x_NS_.shape[2:]), 0, 1)


def _position_major(x_CNc):
    c, n, k = x_CNc.shape
    return jnp.swapaxes(x_CNc, 0, 1).reshape(n, c * k)


def _ce_and_correct(logits_fn, hidden_NcD, labels_Nc):
    logits_NcV = logits_fn(hidden_NcD)
    logits_NcV = logits_NcV.astype(jnp.promote_types(logits_NcV.dtype, jnp.float32))
    ce_Nc = optax.softmax_cross_entropy_with_integer_labels(logits_NcV, labels_Nc)
    correct_Nc = (jnp.argmax(logits_NcV, -1) == labels_Nc).astype(jnp.float32)
    return ce_Nc, correct_Nc


def position_stats(logits_fn: Callable, sources: dict, labels_NS, chunk: int):
    """Per-position ``{name}_ce`` and ``{name}_correct`` ``[N, S]`` for each ``sources[name]`` ``[N, S, E]``.

    ``logits_fn(hidden_NcD) -> logits_NcV`` (the LM head). Row p of every source predicts ``labels_NS[:, p]``.
    The positions are processed ``chunk`` at a time by ``lax.scan`` with a rematerialised body.
    """
    s = labels_NS.shape[1]
    if chunk <= 0 or s % chunk:
        raise ValueError(f"loss chunk {chunk} must be a positive divisor of the length {s}")
    names = sorted(sources)

    @jax.checkpoint  # nothing saved: each chunk's logits are recomputed in the backward pass
    def one_chunk(hiddens, labels_Nc):
        out = {}
        for name, hidden_NcD in zip(names, hiddens):
            out[name + "_ce"], out[name + "_correct"] = _ce_and_correct(logits_fn, hidden_NcD, labels_Nc)
        return out

    def body(carry, xs):
        hiddens, labels_Nc = xs
        return carry, one_chunk(hiddens, labels_Nc)

    xs = (tuple(_chunk_major(sources[n], chunk) for n in names), _chunk_major(labels_NS, chunk))
    _, stats = jax.lax.scan(body, None, xs, unroll=scan_unroll())
    return {k: _position_major(v) for k, v in stats.items()}


def tidar_position_stats(logits_fn, hidden_N2SE, tokens_NS, loss_mask_NS=None, segment_ids_NS=None,
                         chunk: int = 0):
    """Per-target-position statistics of the TiDAR objective over the doubled sequence ``[clean S | mask S]``.

    Returns ``ar_ce, ar_correct, ar_weight, diff_ce, diff_correct, diff_weight`` (each ``[N, S]``, indexed by
    the target position).
    """
    s = tokens_NS.shape[1]
    if hidden_N2SE.shape[1] != 2 * s:
        raise ValueError(f"hidden length {hidden_N2SE.shape[1]} != 2 * tokens length {2 * s}")
    clean_NSE, mask_NSE = hidden_N2SE[:, :s], hidden_N2SE[:, s:]
    # target p reads clean row p-1; position 0 (no AR target, weight 0) reads row 0 so its logits stay finite
    ar_source_NSE = jnp.concatenate([clean_NSE[:, :1], clean_NSE[:, :-1]], axis=1)
    stats = position_stats(logits_fn, {"ar": ar_source_NSE, "diff": mask_NSE}, tokens_NS, chunk or s)
    _, diff_weight = diffusion_targets(tokens_NS, loss_mask_NS)
    stats["ar_weight"] = ar_target_weights(tokens_NS, loss_mask_NS, segment_ids_NS)
    stats["diff_weight"] = diff_weight
    return stats


def ar_position_stats(logits_fn, hidden_NSE, tokens_NS, loss_mask_NS=None, segment_ids_NS=None, chunk: int = 0):
    """Per-target-position statistics of the plain causal-LM loss: ``ar_ce, ar_correct, ar_weight``."""
    s = tokens_NS.shape[1]
    source_NSE = jnp.concatenate([hidden_NSE[:, :1], hidden_NSE[:, :-1]], axis=1)
    stats = position_stats(logits_fn, {"ar": source_NSE}, tokens_NS, chunk or s)
    stats["ar_weight"] = ar_target_weights(tokens_NS, loss_mask_NS, segment_ids_NS)
    return stats


def _mean(values_NS, weights_NS):
    total = jnp.sum(weights_NS)
    return jnp.sum(values_NS * weights_NS) / jnp.maximum(total, 1.0), total


def combine_tidar(stats: dict, alpha: float = 1.0):
    """``(loss, metrics)`` from per-position statistics; the same keys as ``objective.tidar_loss``."""
    ar_loss, ar_count = _mean(stats["ar_ce"], stats["ar_weight"])
    diff_loss, diff_count = _mean(stats["diff_ce"], stats["diff_weight"])
    ar_acc, _ = _mean(stats["ar_correct"], stats["ar_weight"])
    diff_acc, _ = _mean(stats["diff_correct"], stats["diff_weight"])
    loss = (alpha * ar_loss + diff_loss) / (1.0 + alpha)
    return loss, {"loss": loss, "ar_loss": ar_loss, "diff_loss": diff_loss, "ar_acc": ar_acc, "diff_acc": diff_acc,
                  "ar_tokens": ar_count, "diff_tokens": diff_count}


def combine_ar(stats: dict):
    """``(loss, metrics)`` with the keys of ``objective.ar_loss``."""
    loss, count = _mean(stats["ar_ce"], stats["ar_weight"])
    acc, _ = _mean(stats["ar_correct"], stats["ar_weight"])
    return loss, {"loss": loss, "ar_loss": loss, "ar_acc": acc, "ar_tokens": count}


def chunked_tidar_loss(logits_fn, hidden_N2SE, tokens_NS, loss_mask_NS=None, segment_ids_NS=None,
                       alpha: float = 1.0, chunk: int = 0):
    return combine_tidar(tidar_position_stats(logits_fn, hidden_N2SE, tokens_NS, loss_mask_NS, segment_ids_NS,
                                              chunk), alpha)


def chunked_ar_loss(logits_fn, hidden_NSE, tokens_NS, loss_mask_NS=None, segment_ids_NS=None, chunk: int = 0):
    return combine_ar(ar_position_stats(logits_fn, hidden_NSE, tokens_NS, loss_mask_NS, segment_ids_NS, chunk))
