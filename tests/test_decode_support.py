"""Shared helpers for the decode tests (no tests here): tiny models that actually accept drafts.

A random model almost never accepts a draft, which would leave the multi-token paths (k > 1, partial blocks,
EOS inside a block) untested. ``trained_tiny`` trains a tiny TiDAR model for a few hundred steps on
arithmetic sequences (x_{i+1} = x_i + s mod 15, with per-sequence stride s and rare noise), so its diffusion drafts
agree with its AR predictions often but not always. Trained once per test session (cached).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import init_model
from tidar_jax.objective import tidar_loss

VOCAB = 16
MASK_ID = 15
TRAIN_BLOCK = 4


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=64,
                mask_token_id=MASK_ID, block_size=TRAIN_BLOCK)
    base.update(overrides)
    return ModelConfig(**base)


def pattern_batch(rng: np.random.Generator, n: int, length: int, noise: float = 0.05) -> np.ndarray:
    start = rng.integers(0, MASK_ID, size=(n, 1))
    stride = rng.integers(1, 4, size=(n, 1))
    seq = (start + stride * np.arange(length)[None]) % MASK_ID
    flip = rng.random((n, length)) < noise
    return np.where(flip, rng.integers(0, MASK_ID, size=(n, length)), seq).astype(np.int32)


@functools.lru_cache(maxsize=None)
def trained_tiny_state(steps: int = 150, seed: int = 0):
    """(cfg, graphdef, pure-dict params) of a float32 tiny model trained with the TiDAR loss."""
    cfg = tiny_config()
    model = init_model(cfg, seed)
    graphdef, state = nnx.split(model)
    seq = 32
    mask_TT = masks.training_mask(seq, TRAIN_BLOCK)
    pos_T = masks.training_positions(seq)
    tx = optax.adam(3e-3)
    opt_state = tx.init(state)

    def loss_fn(st, tokens_NS):
        n = tokens_NS.shape[0]
        inp = jnp.concatenate([tokens_NS, jnp.full_like(tokens_NS, MASK_ID)], axis=1)
        logits, _ = nnx.merge(graphdef, st)(inp, jnp.broadcast_to(pos_T, (n, 2 * seq)),
                                            jnp.broadcast_to(mask_TT, (n, 2 * seq, 2 * seq)))
        return tidar_loss(logits, tokens_NS)[0]

    @jax.jit
    def train_step(st, os_, tokens_NS):
        loss, grads = jax.value_and_grad(loss_fn)(st, tokens_NS)
        updates, os_ = tx.update(grads, os_, st)
        return optax.apply_updates(st, updates), os_, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        state, opt_state, _ = train_step(state, opt_state, jnp.asarray(pattern_batch(rng, 16, seq)))
    return cfg, graphdef, nnx.to_pure_dict(state)


def trained_tiny(dtype: str = "float32", attention: str = "auto"):
    """A fresh ``Transformer`` with the trained weights, in ``dtype`` (use float64 under ``jax.enable_x64``)."""
    cfg, _, pure = trained_tiny_state()
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype, attention=attention)
    model = init_model(cfg, 0)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), pure))
    nnx.update(model, state)
    return model


def random_tiny(dtype: str = "float32", seed: int = 0, scale: float = 1.0, **overrides):
    """A random tiny model; ``scale`` multiplies every weight matrix to make its distributions peakier."""
    cfg = tiny_config(dtype=dtype, param_dtype=dtype, **overrides)
    model = init_model(cfg, seed)
    if scale != 1.0:
        state = nnx.state(model)
        state = jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, state)
        nnx.update(model, state)
    return model


@functools.lru_cache(maxsize=None)
def trained_decoder(dtype: str = "float32", attention: str = "auto"):
    """One ``Decoder`` per (dtype, attention kernel) for the whole session, so test files share its compiled
    programs. Use the float64 one only inside ``jax.enable_x64(True)``."""
    from tidar_jax.decode import Decoder

    return Decoder.from_model(trained_tiny(dtype, attention))


def pattern_prompts(lengths, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [pattern_batch(rng, 1, n)[0].tolist() for n in lengths]


def plain_forward(dec, rows):
    """``(logits_NTV, StepKV)`` of one plain causal forward (no cache) of a ``Decoder``'s model over the rows,
    right-padded into one jitted batch; causal attention makes each row's outputs independent of the padding."""
    from tidar_jax.model import causal_mask, layer_major

    t = max(len(r) for r in rows)
    toks = jnp.asarray([r + [0] * (t - len(r)) for r in rows], jnp.int32)

    @jax.jit
    def fwd(params, toks):
        n = toks.shape[0]
        model = layer_major.merge(dec.graphdef, params)
        return model(toks, jnp.broadcast_to(jnp.arange(t), (n, t)), causal_mask(n, t))

    return jax.device_get(fwd(dec.params, toks))
