"""Decode-time parameter layout: every decoder layer's weights in buffers of their own.

Training keeps one stacked tensor per layer parameter (leading ``layers`` axis) and scans over it, which keeps
compile time independent of depth. Inside that scan XLA materialises each layer's dynamic slice of a stacked
weight before the matmul reads it (a copy fusion per weight: measured on the project CPU, a 1-token forward of the
Qwen2.5-0.5B shape ran at 2.5x the weight-read bound). A memory-bound decode step then reads and writes every weight
once more than it needs. So decoding converts the params once, at load, into ``LayerMajorParams`` (the stacked
layer subtree split into one state per layer, separate arrays) and runs the layers as straight-line code over
them; the matmuls read each weight where it lies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tidar_jax.model.transformer import LAYERS_KEY


class LayerMajorParams(NamedTuple):
    """``rest``: the params with every stacked layer leaf replaced by a 0-d placeholder (so ``nnx.merge`` builds
    the model without a second copy of the layers); ``layers``: one ``nnx.State`` per layer, in order."""

    rest: Any
    layers: tuple


def _under_layers(path) -> bool:
    return bool(path) and getattr(path[0], "key", None) == LAYERS_KEY


def _drop_layer_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return None


def to_layer_major(params) -> LayerMajorParams:
    """Split the stacked layer parameters into per-layer buffers (one copy, at load; each keeps its stacked
    tensor's sharding minus the layer axis). Idempotent."""
    if isinstance(params, LayerMajorParams):
        return params
    stacked = params[LAYERS_KEY]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    per_layer_shardings = jax.tree.map(lambda x: _drop_layer_axis(getattr(x, "sharding", None)), stacked)

    def split(stacked):
        return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers))

    shardings = None
    if any(s is not None for s in jax.tree.leaves(per_layer_shardings, is_leaf=lambda s: s is None)):
        shardings = tuple(per_layer_shardings for _ in range(num_layers))
    layers = jax.jit(split, out_shardings=shardings)(stacked)
    rest = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros((), x.dtype) if _under_layers(path) else x, params)
    return LayerMajorParams(rest, layers)


class LayerMajorModel:
    """The ``Transformer`` interface the decode engine uses (``cfg``, ``hidden``, ``logits``), running its layers
    over per-layer params."""

    def __init__(self, model, layers):
        self.model, self.layers = model, layers

    @property
    def cfg(self):
        return self.model.cfg

    def hidden(self, tokens_NT, positions_NT, mask_NTS, cache=None):
        return self.model.hidden(tokens_NT, positions_NT, mask_NTS, cache, layer_states=self.layers)

    def logits(self, hidden_NTE):
        return self.model.logits(hidden_NTE)

    def __call__(self, tokens_NT, positions_NT, mask_NTS, cache=None):
        hidden_NTE, step_kv = self.hidden(tokens_NT, positions_NT, mask_NTS, cache)
        return self.logits(hidden_NTE), step_kv


def merge(graphdef, params):
    """``nnx.merge`` for stacked params, a ``LayerMajorModel`` for ``LayerMajorParams``."""
    if isinstance(params, LayerMajorParams):
        return LayerMajorModel(nnx.merge(graphdef, params.rest), params.layers)
    return nnx.merge(graphdef, params)


def abstract_layer_major(params) -> LayerMajorParams:
    """``to_layer_major`` of abstract params (``ShapeDtypeStruct`` leaves, with or without shardings): the same
    layout without allocating, for compiling decode programs ahead of time (``tidar_jax.analysis.decode_plan``)."""
    stacked = params[LAYERS_KEY]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]

    def one_layer(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_drop_layer_axis(getattr(x, "sharding", None)))

    layer = jax.tree.map(one_layer, stacked)
    layers = tuple(layer for _ in range(num_layers))

    def placeholder(path, x):
        if not _under_layers(path):
            return x
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P())
        return jax.ShapeDtypeStruct((), x.dtype, sharding=sharding)

    return LayerMajorParams(jax.tree_util.tree_map_with_path(placeholder, params), layers)
