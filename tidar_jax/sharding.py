"""Mesh construction and the single table that maps logical axis names to the (data, fsdp, tensor) mesh."""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of axes, or None = replicated). The only place this mapping lives.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "cache_length": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes (so ``with_sharding_constraint`` works)."""
    shape = (data, fsdp, tensor)
    if any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"mesh shape {shape}: every axis must be an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {math.prod(shape)} but {len(devices)} devices are "
            f"available; the product must equal the device count")
    if devices and devices[0].platform != "cpu":
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


class ShardingError(ValueError):
    """A mesh axis does not divide the dimension the rules table maps it to (strict mode); one line names both."""


def logical_to_spec(logical_axes, shape=None, mesh: Mesh | None = None, rules=None, strict: bool = False,
                    what: str = "tensor") -> P:
    """PartitionSpec for a tensor with the given logical axis names.

    When ``shape`` and ``mesh`` are given, a mesh axis that does not divide the dimension is dropped (not strict),
    so small models (e.g. 2 kv heads on a 4-way tensor axis) replicate instead of failing; with ``strict`` it is a
    ``ShardingError`` naming the tensor (``what``), the dimension and the mesh axis. A mesh axis already used by an
    earlier dimension is always skipped (e.g. ``embed`` -> fsdp after ``batch`` took it), never an error.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    spec, used = [], set()
    for dim, name in enumerate(logical_axes or ()):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
                if shape[dim] % size:
                    if strict:
                        raise ShardingError(
                            f"{what}: dimension {dim} ({name}) of size {shape[dim]} is not divisible by mesh axis "
                            f"{axis!r} (size {mesh.shape[axis]}{', after ' + repr(kept) if kept else ''}); change "
                            f"the mesh or set mesh.strict=false to replicate it")
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*spec)


def logical_sharding(logical_axes, shape, mesh: Mesh, rules=None, strict: bool = False,
                     what: str = "tensor") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules, strict, what))


def state_shardings(state, mesh: Mesh, rules=None, strict: bool = False):
    """NamedShardings for an ``nnx.State`` whose Variables carry ``logical_axes`` metadata (scalars replicate)."""
    from flax import nnx

    def one(path, var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        if axes is None or getattr(value, "ndim", 0) == 0:
            return NamedSharding(mesh, P())
        what = "parameter " + ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return logical_sharding(axes, value.shape, mesh, rules, strict, what)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh | None = None, shape=None, strict: bool = False) -> P:
    """The spec of a ``[batch, length]`` token array, from the rules table."""
    return logical_to_spec(("batch", "length"), shape, mesh, strict=strict, what="batch")


# ----------------------------------------------------------------------------------------------------------------
# Activation sharding: constraints at block boundaries, active only inside ``activation_mesh(mesh)``
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("tidar_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, strict: bool = False):
    """While tracing inside this context, ``constrain`` pins activations to ``mesh`` by the rules table.

    Outside it (single-device tests, decode) ``constrain`` is the identity, so model code needs no mesh argument.
    """
    token = _ACTIVATION_MESH.set(None if mesh is None else (mesh, strict))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_activation_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_mesh`` block (None outside one): a kernel that XLA cannot partition
    (a Pallas/Mosaic call) wraps itself in a ``shard_map`` over it."""
    active = _ACTIVATION_MESH.get()
    return None if active is None else active[0]


def constrain(x, logical_axes, what: str = "activation"):
    """``with_sharding_constraint`` of ``x`` by its logical axis names, under the active ``activation_mesh``."""
    active = _ACTIVATION_MESH.get()
    if active is None:
        return x
    mesh, strict = active
    spec = logical_to_spec(logical_axes, x.shape, mesh, strict=strict, what=what)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
