"""The functional boundary: split graphdef/state once; jitted code is a pure function of ``state``."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from tidar_jax.config import ModelConfig
from tidar_jax.model.transformer import Transformer
from tidar_jax.sharding import state_shardings


def split(model: Transformer):
    """``(graphdef, state)``; ``state`` is a pytree of arrays (an ``nnx.State``)."""
    return nnx.split(model)


def merge(graphdef, state) -> Transformer:
    return nnx.merge(graphdef, state)


def apply(graphdef, state, tokens_NT, positions_NT, mask_NTS, cache=None):
    """Pure forward: ``(logits_NTV, StepKV)``."""
    return merge(graphdef, state)(tokens_NT, positions_NT, mask_NTS, cache)


def abstract_model(cfg: ModelConfig, remat: bool = False):
    """``(graphdef, abstract_state)`` without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0), remat=remat)))


def create_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0, remat: bool = False):
    """Initialise parameters directly into their mesh shardings (never a full copy on one device)."""
    graphdef, abstract = abstract_model(cfg, remat)
    shardings = state_shardings(abstract, mesh)

    @jax.jit
    def create():
        return nnx.split(Transformer(cfg, nnx.Rngs(params=seed), remat=remat))[1]

    state = jax.jit(create, out_shardings=shardings)()
    return graphdef, state
