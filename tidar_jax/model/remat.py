"""Named rematerialisation (activation checkpointing) policies for the scanned layer stack.

A policy decides which intermediates of one decoder layer are kept for the backward pass; everything else is
recomputed. Names (the ``model.remat`` config value):

* ``none``: no rematerialisation (every intermediate of every layer is kept; fastest, most memory).
* ``full``: nothing saved but the layer's input (the scan carry); the whole layer is recomputed in backward.
* ``qkvo``: save the q/k/v and output projections (tagged with ``checkpoint_name`` in ``Attention``); the MLP,
  norms and attention scores are recomputed.
* ``dots``: save every weight matmul (projections and MLP: dots without batch dimensions); attention scores
  (batched dots, quadratic in length) are recomputed.

Old configs said ``remat: true`` / ``false``; those mean ``full`` / ``none``.
"""

from __future__ import annotations

from tidar_jax.config import ConfigError

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")

REMAT_POLICIES = ("none", "full", "qkvo", "dots")


def policy_name(remat) -> str:
    """The canonical policy name for a config value (a name, or the old booleans)."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return remat
    raise ConfigError(f"model.remat={remat!r}: must be one of {', '.join(REMAT_POLICIES)} (or true/false)")


def checkpoint_policy(name: str):
    """The ``jax.checkpoint`` policy for a policy name (``None`` for ``none``: no checkpointing at all)."""
    import jax

    name = policy_name(name)
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "qkvo":
        return jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def rematerialize(fn, name: str):
    """``fn`` wrapped in ``jax.checkpoint`` with the named policy (``fn`` itself for ``none``)."""
    import jax

    policy = checkpoint_policy(name)
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)  # inside scan, CSE prevention is unneeded
