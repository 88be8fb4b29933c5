"""Activation sharding from the rules table: strict mode's one-line error, and a (2,2,2) mesh with activation
constraints (and the chunked loss) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.config import ModelConfig
from tidar_jax.model import create_sharded
from tidar_jax.sharding import ShardingError, batch_spec, logical_to_spec, make_mesh
from tidar_jax.train.config import OptimSection
from tidar_jax.train.step import BATCH_SPEC, init_train_state, make_step_fns

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_size=64,
                  mask_token_id=63, block_size=4, dtype="float64", param_dtype="float64", attention="reference")
OPTIM = OptimSection(lr=1e-2, min_lr=1e-3, warmup_frac=0.0, weight_decay=0.01, clip_norm=1.0)


def test_strict_mode_names_the_dimension_and_the_mesh_axis():
    mesh = make_mesh(1, 2, 4)
    # kv_heads=2 on a 4-way tensor axis: replicated when not strict, one clear line when strict
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh) == jax.sharding.PartitionSpec(
        "fsdp", None, None)
    with pytest.raises(ShardingError) as err:
        logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh, strict=True, what="parameter k_proj")
    msg = str(err.value)
    assert msg == ("parameter k_proj: dimension 1 (kv_heads) of size 2 is not divisible by mesh axis 'tensor' "
                   "(size 4); change the mesh or set mesh.strict=false to replicate it")
    with pytest.raises(ShardingError, match="batch: dimension 0 \\(batch\\) of size 3"):
        batch_spec(make_mesh(8, 1, 1), (3, 16), strict=True)
    assert BATCH_SPEC == jax.sharding.PartitionSpec(("data", "fsdp"), None)  # derived from the rules table


def _one_step(mesh, loss_chunk, tokens):
    graphdef, params = create_sharded(CFG, mesh, seed=0)
    fns = make_step_fns(graphdef, CFG, params, mesh, OPTIM, total_steps=10, loss_chunk=loss_chunk,
                        strict=False, batch_shape=tokens.shape)
    state = init_train_state(fns.tx, params, fns.state_shardings)
    batch = jax.device_put(tokens, fns.batch_sharding)
    lowered = fns.train_step.lower(state, batch)
    text = lowered.as_text()
    state, metrics = lowered.compile()(state, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics), text


def test_mesh_with_activation_constraints_and_chunked_loss_equals_one_device():
    tokens = np.random.default_rng(0).integers(0, 63, size=(8, 16), dtype=np.int32)
    with jax.enable_x64(True):
        p8, m8, text8 = _one_step(make_mesh(2, 2, 2), 8, tokens)
        p1, m1, _ = _one_step(make_mesh(1, 1, 1, devices=jax.devices()[:1]), 0, tokens)
    # the constraints are really in the program: layer inputs pinned to batch over (data, fsdp)
    assert text8.count("sharding_constraint") >= 2
    for k in ("loss", "ar_loss", "diff_loss", "ar_acc", "diff_acc", "ar_tokens", "diff_tokens", "grad_norm"):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-10, err_msg=k)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
