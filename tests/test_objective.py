import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import apply, init_model, split
from tidar_jax.objective import ar_loss, tidar_loss


def _ce(logits, label):
    logits = np.asarray(logits, np.float64)
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label])


def test_hand_computed_tiny_case():
    # S=3, V=2. clean logits (position i predicts x_{i+1}), mask logits (position i predicts x_i)
    tokens = jnp.array([[0, 1, 1]])
    clean = np.array([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    mask = np.array([[[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    logits = jnp.asarray(np.concatenate([clean, mask], 1))
    loss, m = tidar_loss(logits, tokens, alpha=1.0)
    # AR: pos0 -> label 1, pos1 -> label 1; the last position has no target
    ar = (math.log(1 + math.e ** -1) + math.log(1 + math.e ** 2)) / 2
    diff = (math.log(1 + math.e ** -1) + math.log(1 + math.e ** -3) + math.log(2)) / 3
    assert m["ar_loss"] == pytest.approx(ar, rel=1e-6)
    assert m["diff_loss"] == pytest.approx(diff, rel=1e-6)
    assert loss == pytest.approx((ar + diff) / 2, rel=1e-6)
    assert m["ar_acc"] == pytest.approx(0.5)  # pos0 argmax 1 (right), pos1 argmax 0 (wrong)
    assert m["diff_acc"] == pytest.approx(2 / 3)  # pos0 right, pos1 right, pos2 tie->argmax 0 (wrong: label 1)
    assert m["ar_tokens"] == 2 and m["diff_tokens"] == 3


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0, 1.2, 3.0])
def test_alpha_weighting(alpha):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 7, (2, 6)))
    logits = jnp.asarray(rng.normal(size=(2, 12, 7)))
    loss, m = tidar_loss(logits, tokens, alpha=alpha)
    assert float(loss) == pytest.approx((alpha * float(m["ar_loss"]) + float(m["diff_loss"])) / (1 + alpha), rel=1e-6)


def test_loss_mask_and_segments_match_reference_loop():
    rng = np.random.default_rng(1)
    N, S, V = 3, 8, 11
    tokens = rng.integers(0, V, (N, S))
    logits = rng.normal(size=(N, 2 * S, V))
    valid = rng.random((N, S)) > 0.25
    segs = np.cumsum(rng.random((N, S)) < 0.3, axis=1)
    _, m = tidar_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(segs))
    ar_terms, diff_terms = [], []
    for n in range(N):
        for i in range(S):
            if i + 1 < S and valid[n, i] and valid[n, i + 1] and segs[n, i] == segs[n, i + 1]:
                ar_terms.append(_ce(logits[n, i], tokens[n, i + 1]))
            if valid[n, i]:
                diff_terms.append(_ce(logits[n, S + i], tokens[n, i]))
    assert float(m["ar_loss"]) == pytest.approx(np.mean(ar_terms), rel=1e-5)
    assert float(m["diff_loss"]) == pytest.approx(np.mean(diff_terms), rel=1e-5)
    assert int(m["ar_tokens"]) == len(ar_terms) and int(m["diff_tokens"]) == len(diff_terms)


def test_ar_loss_matches_ar_half():
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 5, (2, 6)))
    logits = jnp.asarray(rng.normal(size=(2, 12, 5)))
    _, m = tidar_loss(logits, tokens)
    loss, m2 = ar_loss(logits[:, :6], tokens)
    assert float(loss) == pytest.approx(float(m["ar_loss"]), rel=1e-6)


def test_gradients_flow_into_both_halves():
    cfg = ModelConfig(vocab_size=31, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=32,
                      mask_token_id=30, block_size=2, tie_embeddings=False)
    graphdef, state = split(init_model(cfg, 0))
    S, B = 4, 2
    tokens = jax.random.randint(jax.random.key(0), (2, S), 0, 30)
    doubled = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_token_id)], 1)
    pos = jnp.broadcast_to(masks.training_positions(S), (2, 2 * S))
    mask = jnp.broadcast_to(masks.training_mask(S, B), (2, 2 * S, 2 * S))

    def loss_of(alpha, which):
        def f(st):
            loss, m = tidar_loss(apply(graphdef, st, doubled, pos, mask)[0], tokens, alpha=alpha)
            return {"total": loss, "ar": m["ar_loss"], "diff": m["diff_loss"]}[which]
        return f

    g_ar = jax.jit(jax.grad(loss_of(1.0, "ar")))(state)
    g_diff = jax.jit(jax.grad(loss_of(1.0, "diff")))(state)
    norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
    assert norm(g_ar) > 0 and norm(g_diff) > 0
    # the mask-token input embedding row (untied head) only gets gradient from the diffusion half
    assert float(jnp.abs(g_ar["embed"][...][cfg.mask_token_id]).sum()) == 0.0
    assert float(jnp.abs(g_diff["embed"][...][cfg.mask_token_id]).sum()) > 0.0
    # total gradient = (alpha * g_ar + g_diff) / (1 + alpha)
    g_tot = jax.jit(jax.grad(loss_of(0.5, "total")))(state)
    jax.tree.map(lambda t, a, d: np.testing.assert_allclose(t, (0.5 * a + d) / 1.5, rtol=1e-4, atol=1e-7),
                 g_tot, g_ar, g_diff)
