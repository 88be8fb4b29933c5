"""Reading checkpoints written with the unrolled layer layout (``layers/0/...``, ``layers/1/...``).

The model now keeps one stacked tensor per layer parameter (leading ``layers`` axis). A checkpoint's own
metadata says which layout it holds; for an unrolled one the restore target is rewritten to per-layer entries
(each with its stacked target's sharding minus the layer axis) and the restored layers are stacked afterwards.
Works for any tree holding a ``layers`` subtree (params, optimizer moments).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

LAYERS_KEY = "layers"


def plain_tree(meta):
    """Orbax metadata trees (mapping-like objects) as nested plain dicts of their leaves."""
    if hasattr(meta, "keys") and hasattr(meta, "__getitem__"):
        return {k: plain_tree(meta[k]) for k in meta.keys()}
    return meta


def _is_unrolled(meta) -> bool:
    return isinstance(meta, Mapping) and len(meta) > 0 and all(str(k).isdigit() for k in meta.keys())


def _drop_layer_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding  # single-device shardings have no axes


def _per_layer(a, i):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=_drop_layer_axis(getattr(a, "sharding", None)))


def holds_unrolled_layers(meta) -> bool:
    """Whether a checkpoint metadata tree has a digit-keyed ``layers`` subtree anywhere."""
    if not isinstance(meta, Mapping):
        return False
    return any((k == LAYERS_KEY and _is_unrolled(v)) or holds_unrolled_layers(v) for k, v in meta.items())


def unrolled_target(target, meta):
    """``target`` (stacked ShapeDtypeStructs) rewritten to the checkpoint's unrolled layout wherever ``meta`` has it."""
    if not isinstance(target, Mapping) or not isinstance(meta, Mapping):
        return target
    out = {}
    for key, sub in target.items():
        sub_meta = meta.get(key, meta.get(str(key))) if hasattr(meta, "get") else None
        if key == LAYERS_KEY and _is_unrolled(sub_meta):
            num = jax.tree.leaves(sub)[0].shape[0]
            if len(sub_meta) != num:
                raise ValueError(f"checkpoint holds {len(sub_meta)} unrolled layers but the model config has {num}")
            out[key] = {str(i): jax.tree.map(lambda a, i=i: _per_layer(a, i), sub) for i in range(num)}
        else:
            out[key] = unrolled_target(sub, sub_meta)
    return out


def stack_unrolled(restored, target):
    """The restored unrolled tree stacked back into ``target``'s layout (and its shardings)."""
    if not isinstance(target, Mapping):
        return restored
    out = {}
    for key, sub in target.items():
        got = restored[key]
        if key == LAYERS_KEY and _is_unrolled(got):
            per_layer = [got[str(i)] for i in range(len(got))]
            out[key] = jax.tree.map(
                lambda t, *xs: jax.device_put(jnp.stack(xs), t.sharding) if getattr(t, "sharding", None) is not None
                else jnp.stack(xs), sub, *per_layer)
        else:
            out[key] = stack_unrolled(got, sub)
    return out
