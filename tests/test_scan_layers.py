"""The scanned layer stack: equals a plain per-layer loop (logits, step K/V, gradients) under every remat
policy; old unrolled params checkpoints load; configs keep accepting the old remat booleans."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax import masks
from tidar_jax.config import ConfigError, ModelConfig
from tidar_jax.model import init_model, split
from tidar_jax.model.functional import merge
from tidar_jax.model.layers import rope_tables
from tidar_jax.model.remat import REMAT_POLICIES, policy_name

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "unrolled_params_v1")


def _cfg(**kw):
    base = dict(vocab_size=48, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=24,
                qkv_bias=True, qk_norm=True, tie_embeddings=False, mask_token_id=47, block_size=2,
                dtype="float64", param_dtype="float64", family="qwen2")
    base.update(kw)
    return ModelConfig(**base)


def unrolled_forward(model, tokens_NT, positions_NT, mask_NTS):
    """Independent reference: a plain Python loop over per-layer slices of the stacked parameters."""
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(model.embed[...], tokens_NT, axis=0).astype(dt)
    cos, sin = rope_tables(positions_NT, cfg.head_dim, cfg.rope_theta, dt)
    layer_graphdef, stacked = nnx.split(model.layers)
    ks, vs = [], []
    for i in range(cfg.num_layers):
        layer = nnx.merge(layer_graphdef, jax.tree.map(lambda p: p[i], stacked))
        x, k, v = layer(x, cos, sin, mask_NTS)
        ks.append(k)
        vs.append(v)
    return model.logits(model.final_norm(x)), jnp.stack(ks), jnp.stack(vs)


def _inputs(cfg, s=6):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size - 1, (2, s)))
    tokens_2S = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_token_id)], axis=1)
    return tokens_2S, masks.training_positions(s)[None], masks.training_mask(s, cfg.block_size)[None]


# one policy in the default suite (the scan + remat path); the others compile the same program with another policy
@pytest.mark.parametrize("policy", [p if p == "full" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in REMAT_POLICIES])
def test_scanned_equals_unrolled_logits_kv_and_grads(policy):
    with jax.enable_x64(True):
        cfg = _cfg()
        graphdef, state = split(init_model(cfg, seed=1, remat=policy))
        for path, var in jax.tree_util.tree_leaves_with_path(state["layers"],
                                                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
            assert var.get_metadata()["logical_axes"][0] == "layers", path  # stacked, replicated by the rules
            assert var.get_value().shape[0] == cfg.num_layers, path
        tokens, pos, mask = _inputs(cfg)
        weights_V = jnp.asarray(np.random.default_rng(1).normal(size=cfg.vocab_size))

        def scanned(st):
            logits, kv = merge(graphdef, st)(tokens, pos, mask)
            return jnp.sum(jnp.tanh(logits) * weights_V), (logits, kv.k_LNTKD, kv.v_LNTKD)

        def reference(st):
            logits, k, v = unrolled_forward(merge(graphdef, st), tokens, pos, mask)
            return jnp.sum(jnp.tanh(logits) * weights_V), (logits, k, v)

        (loss_s, out_s), grad_s = jax.jit(jax.value_and_grad(scanned, has_aux=True))(state)
        (loss_r, out_r), grad_r = jax.jit(jax.value_and_grad(reference, has_aux=True))(state)
        for a, b in zip(out_s, out_r):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(loss_s), float(loss_r), rtol=1e-12)
        for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_r)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_old_unrolled_params_checkpoint_loads():
    """The fixture was written by the unrolled-layer code (``layers/0/...``); each layer lands at its index."""
    from tidar_jax.checkpoint.params import load_params
    from tidar_jax.sharding import make_mesh

    expected = np.load(FIXTURE + "_expected.npz")
    assert any(k.startswith("layers/1/") for k in expected.files)
    for mesh in (None, make_mesh(2, 2, 2)):
        cfg, graphdef, state, _ = load_params(FIXTURE, mesh)
        pure = nnx.to_pure_dict(state)
        for key in expected.files:
            parts = key.split("/")
            node, index = pure, None
            if parts[0] == "layers":
                index, parts = int(parts[1]), ["layers"] + parts[2:]
            for p in parts:
                node = node[p]
            got = np.asarray(node if index is None else node[index])
            assert np.array_equal(got, expected[key]), key
        merge(graphdef, state)  # a usable model


def test_remat_config_names_and_old_booleans():
    from tidar_jax.train.config import load_config

    assert policy_name(True) == "full" and policy_name(False) == "none" and policy_name("qkvo") == "qkvo"
    assert load_config(None, ["model.remat=true"]).model.remat == "full"
    assert load_config(None, ["model.remat=false"]).model.remat == "none"
    assert load_config(None, ["model.remat=dots"]).model.remat == "dots"
    with pytest.raises(ConfigError, match="model.remat='most'.*none, full, qkvo, dots"):
        load_config(None, ["model.remat=most"])
