"""The jitted train step: mesh invariance, gradient accumulation, objectives, NaN guard, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.model import create_sharded
from tidar_jax.sharding import make_mesh
from tidar_jax.train.config import OptimSection
from tidar_jax.train.step import init_train_state, make_schedule, make_step_fns

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_size=64,
                  mask_token_id=63, block_size=4)
OPTIM = OptimSection(lr=1e-2, min_lr=1e-3, warmup_frac=0.0, weight_decay=0.01, clip_norm=1.0)


def _tokens(n=8, s=16, seed=0):
    return np.random.default_rng(seed).integers(0, 63, size=(n, s), dtype=np.int32)


def _run(mesh, steps=2, optim=OPTIM, objective="tidar", cfg=CFG, batches=None):
    graphdef, params = create_sharded(cfg, mesh, seed=0)
    fns = make_step_fns(graphdef, cfg, params, mesh, optim, total_steps=10, objective=objective)
    state = init_train_state(fns.tx, params, fns.state_shardings)
    losses = []
    for i in range(steps):
        batch = batches[i] if batches is not None else _tokens(seed=i)
        tokens = jax.device_put(batch, fns.batch_sharding)
        state, metrics = fns.train_step(state, tokens)
        losses.append(jax.device_get(metrics))
    return state, losses, fns, graphdef


@pytest.fixture(scope="module")
def single():
    """One compiled TiDAR step on one device, shared by the single-device tests (compiles are the cost here)."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = create_sharded(CFG, mesh, seed=0)
    fns = make_step_fns(graphdef, CFG, params, mesh, OPTIM, total_steps=10)
    pure = nnx.to_pure_dict(params)
    fresh = lambda: init_train_state(fns.tx, jax.tree.map(jnp.copy, pure), fns.state_shardings)  # noqa: E731
    return mesh, graphdef, pure, fns, fresh


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_sharded_accumulated_step_equals_single_device_full_batch():
    """(2,2,2) mesh with 2 micro-batches of accumulation == one device, one full batch: same losses and params.

    float64 so that Adam's sign-like updates on near-zero gradients cannot hide a real difference.
    """
    mesh8 = make_mesh(2, 2, 2)
    mesh1 = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg64 = CFG.replace(dtype="float64", param_dtype="float64")
    accum2 = OptimSection(**{**OPTIM.__dict__, "grad_accum": 2})
    with jax.enable_x64(True):
        s8, l8, _, _ = _run(mesh8, cfg=cfg64, optim=accum2)
        s1, l1, _, _ = _run(mesh1, cfg=cfg64)
    # the params really are distributed on the 8-device mesh
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(s8["params"]))
    for a, b in zip(l8, l1):
        for k in ("loss", "ar_loss", "diff_loss", "ar_acc", "diff_acc", "grad_norm", "lr"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-10, err_msg=k)
    assert l1[1]["loss"] != l1[0]["loss"]
    for a, b in zip(_host(s8), _host(s1)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert int(s8["step"]) == int(s1["step"]) == 2


def test_tidar_clean_half_is_the_ar_objective(single):
    """Clean tokens never attend to masks, so the TiDAR step's AR term equals the AR-only objective's loss, and
    the held-out AR-mode eval (causal forward over S) reproduces both terms."""
    mesh, graphdef, pure, fns, fresh = single
    batch = jax.device_put(_tokens(), fns.batch_sharding)
    _, m_tidar = fns.train_step(fresh(), batch)
    ar_fns = make_step_fns(graphdef, CFG, fns.template, mesh, OPTIM, total_steps=10, objective="ar")
    _, m_ar = ar_fns.train_step(init_train_state(ar_fns.tx, jax.tree.map(jnp.copy, pure), ar_fns.state_shardings),
                                batch)
    np.testing.assert_allclose(m_tidar["ar_loss"], m_ar["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_tidar["ar_acc"], m_ar["ar_acc"], rtol=1e-6)
    np.testing.assert_allclose(m_tidar["loss"], (m_tidar["ar_loss"] + m_tidar["diff_loss"]) / 2, rtol=1e-6)
    ev = jax.device_get(fns.eval_step(pure, batch))
    np.testing.assert_allclose(ev["ar_loss"], m_tidar["ar_loss"], rtol=1e-5)
    np.testing.assert_allclose(ev["diff_loss"], m_tidar["diff_loss"], rtol=1e-5)


def test_loss_matches_plain_numpy_cross_entropy(single):
    """Independent check of the loss wiring: numpy CE over logits of the model run outside the step."""
    from tidar_jax.masks import training_mask, training_positions
    from tidar_jax.train.step import to_model

    mesh, graphdef, pure, fns, fresh = single
    batch = _tokens()
    n, s = batch.shape
    doubled = np.concatenate([batch, np.full_like(batch, CFG.mask_token_id)], axis=1)
    logits = np.asarray(to_model(graphdef, fns.template, pure)(
        doubled, training_positions(s)[None], training_mask(s, CFG.block_size)[None])[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ar = np.mean([-logp[b, i, batch[b, i + 1]] for b in range(n) for i in range(s - 1)])
    diff = np.mean([-logp[b, s + i, batch[b, i]] for b in range(n) for i in range(s)])
    _, m = fns.train_step(fresh(), jax.device_put(batch, fns.batch_sharding))
    np.testing.assert_allclose(m["ar_loss"], ar, rtol=1e-5)
    np.testing.assert_allclose(m["diff_loss"], diff, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], (ar + diff) / 2, rtol=1e-5)


def test_non_finite_loss_leaves_state_untouched(single):
    mesh, graphdef, pure, fns, fresh = single
    state = fresh()
    state["params"]["embed"] = state["params"]["embed"].at[3, 0].set(jnp.nan)
    before = _host(state)
    state, metrics = fns.train_step(state, jax.device_put(_tokens(), fns.batch_sharding))
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, _host(state)):
        np.testing.assert_array_equal(a, b)


def test_training_reduces_loss_on_a_repeated_batch(single):
    mesh, graphdef, pure, fns, fresh = single
    state, batch = fresh(), jax.device_put(_tokens(), fns.batch_sharding)
    losses = []
    for _ in range(8):
        state, m = fns.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert int(state["step"]) == 8


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_warmup_and_end(schedule):
    optim = OptimSection(lr=1e-3, min_lr=1e-4, warmup_frac=0.1, schedule=schedule)
    sched = make_schedule(optim, 100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    assert float(sched(5)) == pytest.approx(5e-4, rel=1e-5)
    end = 1e-4 if schedule == "cosine" else 1e-3
    np.testing.assert_allclose(float(sched(100)), end, rtol=1e-5)
    vals = [float(sched(i)) for i in range(10, 101)]
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))
