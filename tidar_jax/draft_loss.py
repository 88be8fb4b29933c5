"""Draft-loss options for TiDAR's diffusion half: terms that aim the drafts at what the verifier accepts.

The paper trains the mask half with cross-entropy against the data only. In lossless decoding a draft counts only
if it equals the AR head's own (greedy) choice, and the chain breaks at the first miss. Three optional terms, all
off by default (``DraftLoss()`` leaves ``tidar_loss`` exactly the paper's objective):

* **distillation** (``distill_weight`` w_d, ``distill_temperature`` T): at every target position p,
  ``T^2 * KL(sg(softmax(a_p / T)) || softmax(d_p / T))`` where ``a_p`` are the AR logits predicting x_p (clean row
  p-1) and ``d_p`` the diffusion logits predicting x_p (mask row p). ``sg`` is stop-gradient: the teacher (the AR
  half) receives no gradient from this term.
* **position weighting** (``position_weighting``, ``position_decay`` gamma): slot j of a block (j = p mod B)
  weighs ``w_j = gamma^j / mean_i(gamma^i)`` in the diffusion cross-entropy and the distillation term, so the
  first slots, which every accepted chain passes through, count more; the weights average 1 over a block so the
  loss scale is unchanged.
* **chain** (``chain_weight`` w_c): one minus a differentiable surrogate for the fraction of a block's drafts that
  lossless greedy decoding accepts. Derived here from first principles (the public abstract of arXiv 2606.11552,
  "Teaching Diffusion to Speculate Left-to-Right", names a chain loss that substitutes a differentiable surrogate
  for the expected accepted length, but its formula was not available to us):

  With ``slot0="verifier"`` the first token of a block is the verifier's own, so a step accepts
  ``1 + L`` tokens where L is the length of the leading run of slots 1..B-1 whose draft equals the verifier's
  greedy token ``y_p = argmax a_p``. Scoring a draft at slot j as accepted with probability
  ``q_p = softmax(d_p)[y_p]`` (exact if the draft were sampled from the diffusion distribution; the greedy draft
  is accepted whenever q_p > 1/2) and treating slots as independent given the context,

      E[L] = sum_{j=1}^{B-1} prod_{i=1}^{j} q_{kB+i}   for block k.

  Per block the surrogate is computed in log space, ``prod_i q_i = exp(cumsum_i log q_i)``, and

      L_chain = 1 - sum_k E[L_k] / sum_k sum_{j=1}^{B-1} R_{k,j}

  where ``R_{k,j}`` is 1 when every slot 1..j of block k has a valid target (so a padded or cross-document slot
  ends the chain). For full blocks this is ``1 - mean_k E[L_k] / (B-1)`` in [0, 1]. The context is the data
  (teacher forcing), not the drafts themselves: the verifier's token is taken given the true prefix. Its gradient
  on slot i is ``-sum_{j>=i} prod_{l<=j} q_l`` (divided by the normaliser), so an early slot's error costs every
  later draft of the chain.

Target-aligned form (shared with the chunked loss): every term is first a per-position statistic computed from
the AR and diffusion logits of the *same* target position (``position_stats``), then a block-level combination
into sums (``block_sums``) that add over block-aligned chunks, then a ratio (``finalize``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

POSITION_WEIGHTINGS = ("none", "exponential")


@dataclasses.dataclass(frozen=True)
class DraftLoss:
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    chain_weight: float = 0.0
    position_weighting: str = "none"  # none | exponential
    position_decay: float = 1.0  # gamma of the exponential weighting, in (0, 1]

    def __post_init__(self):
        for key, value, ok, allowed in (
                ("distill_weight", self.distill_weight, self.distill_weight >= 0, "must be >= 0"),
                ("distill_temperature", self.distill_temperature, self.distill_temperature > 0, "must be > 0"),
                ("chain_weight", self.chain_weight, self.chain_weight >= 0, "must be >= 0"),
                ("position_weighting", self.position_weighting, self.position_weighting in POSITION_WEIGHTINGS,
                 "must be one of " + ", ".join(POSITION_WEIGHTINGS)),
                ("position_decay", self.position_decay, 0 < self.position_decay <= 1, "must be in (0, 1]")):
            if not ok:
                raise ValueError(f"{key}={value!r}: {allowed}")

    @property
    def weighted_positions(self) -> bool:
        return self.position_weighting != "none"

    @property
    def active(self) -> bool:
        """False for the paper recipe (every term off): ``tidar_loss`` then runs the paper's objective unchanged."""
        return self.distill_weight > 0 or self.chain_weight > 0 or self.weighted_positions

    @classmethod
    def from_train(cls, train) -> "DraftLoss":
        """From the ``train`` config section (``distill_weight``, ``chain_weight``, ...)."""
        return cls(**{f.name: getattr(train, f.name) for f in dataclasses.fields(cls)})


def slot_weights(block_size: int, opts: DraftLoss) -> np.ndarray:
    """``[B]`` float64 weights of the slots of a block (static: they depend on the options only); mean 1."""
    if opts.position_weighting == "none":
        return np.ones((block_size,))
    w_B = float(opts.position_decay) ** np.arange(block_size, dtype=np.float64)
    return w_B / w_B.mean()


def position_stats(teacher_NTV, student_NTV, opts: DraftLoss) -> dict:
    """Per-target-position statistics; both logits predict the same token (teacher: AR, student: diffusion).

    Returns ``kl_NT`` (T^2-scaled KL from the stop-gradient teacher at temperature T) when distillation is on and
    ``logq_NT`` (log of the student's probability of the teacher's greedy token) when the chain is on.
    """
    teacher_NTV = jax.lax.stop_gradient(teacher_NTV)
    out = {}
    if opts.distill_weight > 0:
        t = opts.distill_temperature
        logp_t = jax.nn.log_softmax(teacher_NTV / t, axis=-1)
        logq_t = jax.nn.log_softmax(student_NTV / t, axis=-1)
        out["kl_NT"] = (t * t) * jnp.sum(jnp.exp(logp_t) * (logp_t - logq_t), axis=-1)
    if opts.chain_weight > 0:
        y_NT = jnp.argmax(teacher_NTV, axis=-1)
        logq = jax.nn.log_softmax(student_NTV, axis=-1)
        out["logq_NT"] = jnp.take_along_axis(logq, y_NT[..., None], axis=-1)[..., 0]
    return out


def block_sums(diff_ce_NS, diff_w_NS, stats: dict, teacher_w_NS, block_size: int, opts: DraftLoss) -> dict:
    """Numerators and denominators of every term over whole blocks; they add over block-aligned chunks.

    ``diff_w_NS``: 1 where mask row p has a valid target; ``teacher_w_NS``: 1 where the AR row p-1 also predicts
    x_p (the teacher exists); ``stats``: ``position_stats`` at every position (anything at invalid positions).
    """
    n, s = diff_ce_NS.shape
    b = block_size
    slot_NS = jnp.asarray(np.tile(slot_weights(b, opts), s // b)[None], diff_ce_NS.dtype)
    sums = {"ce_num": jnp.sum(diff_ce_NS * diff_w_NS * slot_NS), "ce_den": jnp.sum(diff_w_NS * slot_NS)}
    both_NS = diff_w_NS * teacher_w_NS
    if "kl_NT" in stats:
        sums["kl_num"] = jnp.sum(stats["kl_NT"] * both_NS * slot_NS)
        sums["kl_den"] = jnp.sum(both_NS * slot_NS)
    if "logq_NT" in stats:
        # slots 1..B-1 of each block; a slot without a valid target ends the chain (R = 0 from there on)
        v_NOJ = both_NS.reshape(n, s // b, b)[..., 1:]
        logq_NOJ = jnp.where(v_NOJ > 0, stats["logq_NT"].reshape(n, s // b, b)[..., 1:], 0.0)
        reach_NOJ = jnp.cumprod(v_NOJ, axis=-1)
        prefix_NOJ = reach_NOJ * jnp.exp(jnp.cumsum(logq_NOJ, axis=-1))
        sums["chain_num"] = jnp.sum(prefix_NOJ)
        sums["chain_den"] = jnp.sum(reach_NOJ)
    return sums


def finalize(sums: dict, opts: DraftLoss) -> tuple[jax.Array, dict]:
    """``(draft_term, metrics)``: the diffusion half's objective ``CE_w + w_d * KL + w_c * L_chain``."""
    ce = sums["ce_num"] / jnp.maximum(sums["ce_den"], 1e-9)
    term, metrics = ce, {"diff_ce_weighted": ce}
    if "kl_num" in sums:
        kl = sums["kl_num"] / jnp.maximum(sums["kl_den"], 1e-9)
        term = term + opts.distill_weight * kl
        metrics["distill_kl"] = kl
    if "chain_num" in sums:
        rate = sums["chain_num"] / jnp.maximum(sums["chain_den"], 1.0)
        term = term + opts.chain_weight * (1.0 - rate)
        metrics["chain_accept_rate"] = rate
    metrics["draft_loss"] = term
    return term, metrics
