"""Splash on a multi-device mesh: inside ``activation_mesh`` (as the train step traces) the Mosaic call runs in a
``jax.shard_map`` over rows and heads, and equals the reference kernel in outputs and gradients (Pallas
interpreter on the 8 fake CPU devices). The TPU compile of the whole train step is in tests/test_target_plans.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tidar_jax import masks
from tidar_jax.attention import reference, splash
from tidar_jax.sharding import activation_mesh, make_mesh
from kernel_cases import assert_close


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((4, 1, 2), marks=pytest.mark.slow),
                                        pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_sharded_splash_equals_reference(mesh_shape):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:8])
    seg_NS = jnp.asarray(np.cumsum(np.random.default_rng(5).random((4, 64)) < 0.2, axis=1), jnp.int32)
    layout = masks.training_layout(64, 16, seg_NS)
    rng = np.random.default_rng(0)
    q, w = (jnp.asarray(rng.normal(size=(4, 128, 4, 128)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(4, 128, 2, 128)), jnp.float32) for _ in range(2))

    def loss(kernel, q, k, v):
        out = kernel(q, k, v, layout)
        return jnp.sum(out * w), out

    def sharded(q, k, v, lay):
        with activation_mesh(mesh):
            return splash.attend(q, k, v, lay, interpret=True)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(sharded, *a), argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    (_, out_ref), grads_ref = jax.value_and_grad(lambda *a: loss(reference.attend, *a), argnums=(0, 1, 2),
                                                 has_aux=True)(q, k, v)
    assert_close((out, grads), (out_ref, grads_ref), 1e-5)
