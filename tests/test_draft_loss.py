"""Draft-loss options (distillation, position weighting, chain) against plain-loop references; gradients; the
paper objective when every option is off; the stop-gradient teacher; config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.config import ConfigError
from tidar_jax.draft_loss import DraftLoss
from tidar_jax.objective import tidar_loss
from tidar_jax.train.config import load_config

N, S, V, B = 2, 8, 5, 4


def _data(seed=0, masked=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (N, S))
    logits = rng.normal(size=(N, 2 * S, V)) * 2.0
    valid = rng.random((N, S)) > 0.15 if masked else np.ones((N, S), bool)
    segs = np.cumsum(rng.random((N, S)) < 0.2, axis=1) if masked else np.zeros((N, S), int)
    return tokens, logits, valid, segs


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def reference_loss(tokens, logits, valid, segs, opts: DraftLoss, alpha=1.0, teacher=None):
    """Plain-Python loops over rows, blocks and slots. ``teacher``: the logits the draft terms read the AR
    distribution from (default ``logits``); a fixed copy makes it a stop-gradient for finite differences."""
    teacher = logits if teacher is None else teacher
    n_rows, s = tokens.shape
    gamma = opts.position_decay if opts.position_weighting == "exponential" else 1.0
    raw = [gamma ** j for j in range(B)]
    w_slot = [r / (sum(raw) / B) for r in raw]
    ar_terms, ce_num, ce_den, kl_num, kl_den = [], 0.0, 0.0, 0.0, 0.0
    chain_num = chain_den = 0.0

    def teacher_ok(r, p):  # clean row p-1 predicts x_p
        return p >= 1 and valid[r, p - 1] and valid[r, p] and segs[r, p - 1] == segs[r, p]

    for r in range(n_rows):
        for i in range(s - 1):
            if valid[r, i] and valid[r, i + 1] and segs[r, i] == segs[r, i + 1]:
                ar_terms.append(-_log_softmax(logits[r, i])[tokens[r, i + 1]])
        for k in range(s // B):
            prod, reach = 1.0, True
            for j in range(B):
                p = k * B + j
                if valid[r, p]:
                    ce_num += w_slot[j] * -_log_softmax(logits[r, s + p])[tokens[r, p]]
                    ce_den += w_slot[j]
                if valid[r, p] and teacher_ok(r, p):
                    t = opts.distill_temperature
                    lp = _log_softmax(teacher[r, p - 1] / t)
                    lq = _log_softmax(logits[r, s + p] / t)
                    kl_num += w_slot[j] * t * t * float(np.sum(np.exp(lp) * (lp - lq)))
                    kl_den += w_slot[j]
                if j == 0:
                    continue
                reach = reach and bool(valid[r, p]) and teacher_ok(r, p)
                if not reach:
                    continue
                y = int(np.argmax(teacher[r, p - 1]))
                prod *= math.exp(_log_softmax(logits[r, s + p])[y])
                chain_num += prod
                chain_den += 1
    ar = float(np.mean(ar_terms))
    draft = ce_num / ce_den
    if opts.distill_weight > 0:
        draft += opts.distill_weight * kl_num / kl_den
    if opts.chain_weight > 0:
        draft += opts.chain_weight * (1 - chain_num / max(chain_den, 1.0))
    return (alpha * ar + draft) / (1 + alpha), {"kl": kl_num / max(kl_den, 1e-9),
                                                "rate": chain_num / max(chain_den, 1.0)}


OPTIONS = {
    "distill": DraftLoss(distill_weight=0.7, distill_temperature=2.0),
    "position": DraftLoss(position_weighting="exponential", position_decay=0.6),
    "chain": DraftLoss(chain_weight=1.5),
    "all": DraftLoss(distill_weight=0.5, distill_temperature=1.5, chain_weight=1.0,
                     position_weighting="exponential", position_decay=0.8),
}


NAMES = sorted(OPTIONS)


@jax.jit
def _all_losses(logits, tokens, valid, segs):
    """Every option's (loss, metrics) in one compile (compiles dominate these tests' time)."""
    return {k: tidar_loss(logits, tokens, valid, segs, alpha=0.8, draft=OPTIONS[k], block_size=B) for k in NAMES}


@jax.jit
def _all_grads(logits, tokens, valid, segs):
    return {k: jax.grad(lambda lg, o=OPTIONS[k]: tidar_loss(lg, tokens, valid, segs, draft=o, block_size=B)[0])(
        logits) for k in NAMES}


def test_each_term_matches_plain_loop_reference():
    with jax.enable_x64(True):
        for seed, masked in ((0, True), (1, False)):
            tokens, logits, valid, segs = _data(seed, masked)
            out = _all_losses(*map(jnp.asarray, (logits, tokens, valid, segs)))
            for name in NAMES:
                loss, m = out[name]
                ref, parts = reference_loss(tokens, logits, valid, segs, OPTIONS[name], alpha=0.8)
                assert float(loss) == pytest.approx(ref, rel=1e-10), name
                if "distill_kl" in m:
                    assert float(m["distill_kl"]) == pytest.approx(parts["kl"], rel=1e-10)
                if "chain_accept_rate" in m:
                    assert float(m["chain_accept_rate"]) == pytest.approx(parts["rate"], rel=1e-10)
            assert set(out["all"][1]) >= {"distill_kl", "chain_accept_rate", "draft_loss", "diff_loss"}


def test_gradients_match_finite_differences():
    tokens, logits, valid, segs = _data(2)
    with jax.enable_x64(True):
        grads = jax.device_get(_all_grads(*map(jnp.asarray, (logits, tokens, valid, segs))))
    rng = np.random.default_rng(3)
    eps = 1e-6
    coords = [tuple(rng.integers(0, d) for d in logits.shape) for _ in range(10)] + [(0, 1, 2), (1, S + 5, 0)]
    for name in NAMES:
        # the plain-loop reference (teacher held fixed), differentiated numerically at coordinates of both halves
        for idx in coords:
            up, down = logits.copy(), logits.copy()
            up[idx] += eps
            down[idx] -= eps
            num = (reference_loss(tokens, up, valid, segs, OPTIONS[name], teacher=logits)[0]
                   - reference_loss(tokens, down, valid, segs, OPTIONS[name], teacher=logits)[0])
            assert grads[name][idx] == pytest.approx(num / (2 * eps), abs=1e-7, rel=1e-5), (name, idx)


OFF = DraftLoss(distill_weight=0.0, distill_temperature=3.0, chain_weight=0.0, position_decay=0.5)
FLAT = DraftLoss(position_weighting="exponential", position_decay=1.0)


@jax.jit
def _paper_vs_off(logits, tokens, valid, segs):
    def vg(opts):
        return jax.value_and_grad(lambda lg: tidar_loss(lg, tokens, valid, segs, draft=opts, block_size=B)[0])(logits)
    return vg(None), vg(OFF), vg(FLAT)


def test_options_off_are_the_paper_loss_exactly():
    assert not OFF.active and FLAT.active
    tokens, logits, valid, segs = _data(4)
    (l0, g0), (l1, g1), (l2, g2) = _paper_vs_off(*map(jnp.asarray, (logits, tokens, valid, segs)))
    assert float(l0) == float(l1)
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))
    # exponential weighting with decay 1 weighs every slot 1: the paper's loss and gradients (up to rounding)
    assert float(l2) == pytest.approx(float(l0), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g0), rtol=1e-5, atol=1e-7)


TEACHER_CASES = (DraftLoss(distill_weight=1.0, distill_temperature=2.0), DraftLoss(chain_weight=1.0))


@jax.jit
def _diffusion_only_grads(logits, tokens, valid, segs):
    """alpha=0: only the diffusion half's objective, with each draft term and without."""
    def g(opts):
        return jax.grad(lambda lg: tidar_loss(lg, tokens, valid, segs, alpha=0.0, draft=opts, block_size=B)[0])(logits)
    return g(None), [g(o) for o in TEACHER_CASES]


def test_teacher_is_stop_gradient():
    """The draft terms send no gradient into the clean (AR) half's logits, and they do move the diffusion half."""
    tokens, logits, valid, segs = _data(5, masked=False)
    g_ce, g_terms = jax.device_get(_diffusion_only_grads(*map(jnp.asarray, (logits, tokens, valid, segs))))
    assert np.all(g_ce[:, :S] == 0.0)
    for g in g_terms:
        assert np.all(g[:, :S] == 0.0)
        assert np.abs(g[:, S:] - g_ce[:, S:]).max() > 1e-4


def test_chain_rewards_early_slots_more():
    """The chain gradient on slot 1's logit of the verifier's token exceeds slot 3's (every chain passes slot 1)."""
    tokens, logits, valid, segs = _data(6, masked=False)
    logits[:, S:] *= 0.1  # uncertain drafts: all slots alike
    g_ce, (_, g_chain) = jax.device_get(_diffusion_only_grads(*map(jnp.asarray, (logits, tokens, valid, segs))))
    g = g_chain - g_ce
    y1 = int(np.argmax(logits[0, 0]))  # teacher for target 1 (slot 1 of block 0)
    y3 = int(np.argmax(logits[0, 2]))  # teacher for target 3 (slot 3 of block 0)
    assert g[0, S + 1, y1] < g[0, S + 3, y3] < 0


def test_draft_options_need_a_block_size():
    tokens, logits, valid, segs = _data(0)
    with pytest.raises(ValueError, match="block_size"):
        tidar_loss(jnp.asarray(logits), jnp.asarray(tokens), draft=DraftLoss(chain_weight=1.0))
    with pytest.raises(ValueError, match="block_size"):
        tidar_loss(jnp.asarray(logits), jnp.asarray(tokens), draft=DraftLoss(chain_weight=1.0), block_size=3)


@pytest.mark.parametrize("override, message", [
    ("train.distill_weight=-1", "train.distill_weight=-1.0: must be >= 0"),
    ("train.distill_temperature=0", "train.distill_temperature=0.0: must be > 0"),
    ("train.chain_weight=-0.5", "train.chain_weight=-0.5: must be >= 0"),
    ("train.position_weighting=linear", "train.position_weighting='linear': must be one of none, exponential"),
    ("train.position_decay=1.5", "train.position_decay=1.5: must be in (0, 1]"),
    ("train.position_decay=0", "train.position_decay=0.0: must be in (0, 1]"),
    ("train.chain_weight=x", "train.chain_weight='x': must be a number"),
])
def test_bad_config_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_draft_options_need_the_tidar_objective():
    with pytest.raises(ConfigError, match="need objective tidar"):
        load_config("configs/tiny.yaml", ["train.objective=ar", "train.distill_weight=0.5"])


def test_config_defaults_are_the_paper_recipe():
    assert not DraftLoss.from_train(load_config(None).train).active
    cfg = load_config("configs/tiny.yaml", ["train.chain_weight=0.5", "train.position_weighting=exponential",
                                            "train.position_decay=0.7"])
    assert DraftLoss.from_train(cfg.train) == DraftLoss(chain_weight=0.5, position_weighting="exponential",
                                                        position_decay=0.7)
    with pytest.raises(ValueError, match="position_decay=0.0"):
        DraftLoss(position_decay=0.0)


def test_train_step_passes_the_draft_options_and_flops_match_the_analytic_count():
    """The jitted train step trains with the options (their metrics appear); its compiled FLOPs (XLA cost
    analysis) agree with the analytic matmul count that the equal-compute study uses."""
    from tidar_jax.config import ModelConfig
    from tidar_jax.model import create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import OptimSection
    from tidar_jax.train.flops import train_step_flops
    from tidar_jax.train.step import init_train_state, make_step_fns

    cfg = ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=64,
                      mask_token_id=511, block_size=4)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = create_sharded(cfg, mesh, seed=0)
    fns = make_step_fns(graphdef, cfg, params, mesh, OptimSection(), total_steps=4, draft=OPTIONS["all"])
    state = init_train_state(fns.tx, params, fns.state_shardings)
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 511, (4, 16), dtype=np.int32), fns.batch_sharding)
    # train_step wraps a jit (optional segment ids); one outer jit gives one compiled program to count and to run
    compiled = jax.jit(lambda st, t: fns.train_step(st, t)).lower(state, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = float(cost["flops"]) / train_step_flops(cfg, 4, 16, "tidar")
    print("compiled / analytic FLOPs", ratio)
    assert 1.0 <= ratio < 1.25  # the analytic count is matmuls only; norms, softmaxes, the optimizer add a little
    _, m = jax.device_get(compiled(state, tokens))
    assert np.isfinite(m["loss"]) and 0 <= m["chain_accept_rate"] <= 1 and m["distill_kl"] >= 0
    assert m["loss"] == pytest.approx((m["ar_loss"] + m["draft_loss"]) / 2, rel=1e-5)
