"""Model invariants: masks never leak, the decode layout's draft rows are a plain causal forward, meshes agree."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax import masks
from tidar_jax.attention import pallas_gpu
from tidar_jax.config import ModelConfig
from tidar_jax.model import KVCache, causal_mask, create_sharded, init_model, split
from tidar_jax.model import apply as _apply

apply = jax.jit(_apply, static_argnums=0)  # one compile per shape instead of op-by-op dispatch
from tidar_jax.sharding import make_mesh

VOCAB = 97
FAMILIES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=12, tie_embeddings=False),
}


def tiny(dtype="float64", **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=48,
                mask_token_id=VOCAB - 1, block_size=4, dtype=dtype, param_dtype=dtype)
    base.update(kw)
    return ModelConfig(**base)


def randomize(state, seed):
    """Give biases/norm scales non-trivial values so the tests exercise them."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, new)


def model_fn(cfg, seed=0):
    graphdef, state = split(init_model(cfg, seed))
    return graphdef, randomize(state, seed + 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_layout_clean_half_equals_causal_forward(family):
    with jax.enable_x64(True):
        cfg = tiny(**FAMILIES[family])
        graphdef, state = model_fn(cfg)
        S, B, N = 12, 4, 2
        tokens = jax.random.randint(jax.random.key(3), (N, S), 0, VOCAB - 1)
        doubled = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_token_id)], axis=1)
        pos = jnp.broadcast_to(masks.training_positions(S), (N, 2 * S))
        mask = jnp.broadcast_to(masks.training_mask(S, B), (N, 2 * S, 2 * S))
        logits, _ = apply(graphdef, state, doubled, pos, mask)
        causal, _ = apply(graphdef, state, tokens, jnp.broadcast_to(jnp.arange(S), (N, S)), causal_mask(N, S))
        np.testing.assert_allclose(np.asarray(logits[:, :S]), np.asarray(causal), rtol=0, atol=1e-12)


def _kernel_context(kernel):
    """The GPU kernel runs in the Pallas interpreter here."""
    return pallas_gpu.interpreting() if kernel == "pallas_gpu" else contextlib.nullcontext()


def _training_mask_for(kernel, S, B):
    """The dense mask for the reference kernel, the layout object for any other kernel."""
    return masks.training_mask(S, B)[None] if kernel == "reference" else masks.training_layout(S, B)


# every family with the reference kernel (dense mask); the blockwise and pallas_gpu kernels (layout object) once
@pytest.mark.parametrize("family,kernel", [(f, "reference") for f in sorted(FAMILIES)] +
                         [("qwen3", "blockwise"), pytest.param("qwen3", "pallas_gpu", marks=pytest.mark.slow)])
def test_mask_block_ignores_future_clean_tokens(family, kernel):
    with jax.enable_x64(True), _kernel_context(kernel):
        cfg = tiny(**FAMILIES[family], attention=kernel)
        graphdef, state = model_fn(cfg, seed=4)
        S, B = 12, 4
        pos = masks.training_positions(S)[None]
        mask = _training_mask_for(kernel, S, B)
        base = jax.random.randint(jax.random.key(5), (1, S), 0, VOCAB - 1)
        mask_half = jnp.full_like(base, cfg.mask_token_id)
        ref, _ = apply(graphdef, state, jnp.concatenate([base, mask_half], 1), pos, mask)
        for b in range(S // B):
            changed = base.at[:, b * B:].set((base[:, b * B:] + 7) % (VOCAB - 1))
            out, _ = apply(graphdef, state, jnp.concatenate([changed, mask_half], 1), pos, mask)
            # blocks <= b only see clean tokens < their own start <= bB: unchanged
            np.testing.assert_allclose(np.asarray(out[:, S:S + (b + 1) * B]),
                                       np.asarray(ref[:, S:S + (b + 1) * B]), rtol=0, atol=1e-12)
            if b * B + B < S:
                # sanity: a later block does see the change (the test can fail)
                assert not np.allclose(np.asarray(out[:, S + (b + 1) * B:]), np.asarray(ref[:, S + (b + 1) * B:]))


# pallas_gpu (Pallas interpreter, ~20 s) with -m slow; the default suite runs it on the prefill layout below
@pytest.mark.parametrize("kernel", ["reference", "blockwise", pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_mask_block_does_not_see_other_mask_blocks(kernel):
    with jax.enable_x64(True), _kernel_context(kernel):
        cfg = tiny(attention=kernel)
        graphdef, state = model_fn(cfg, seed=6)
        S, B = 8, 4
        pos = masks.training_positions(S)[None]
        mask = _training_mask_for(kernel, S, B)
        clean = jax.random.randint(jax.random.key(7), (1, S), 0, VOCAB - 1)
        half = jnp.full_like(clean, cfg.mask_token_id)
        ref, _ = apply(graphdef, state, jnp.concatenate([clean, half], 1), pos, mask)
        # replace block 1's mask tokens: block 0 (and the clean half) must not change
        other = half.at[:, B:].set(3)
        out, _ = apply(graphdef, state, jnp.concatenate([clean, other], 1), pos, mask)
        np.testing.assert_allclose(np.asarray(out[:, :S + B]), np.asarray(ref[:, :S + B]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("B,kernel", [(1, "reference"), (2, "reference"), (3, "reference"), (4, "reference"),
                                      (3, "blockwise")])
def test_decode_layout_draft_rows_equal_causal_forward(B, kernel):
    with jax.enable_x64(True):
        cfg = tiny(**FAMILIES["qwen3"], attention=kernel)
        graphdef, state = model_fn(cfg, seed=8)
        L, C = 7, 16
        seq = jax.random.randint(jax.random.key(9), (1, L + B), 0, VOCAB - 1)
        full, kv = apply(graphdef, state, seq, jnp.arange(L + B)[None], causal_mask(1, L + B))
        # build a cache holding the prefix's K/V (slots >= L hold garbage that must be invisible)
        cache = KVCache.empty(cfg, 1, C, jnp.float64)
        k = cache.k_LNCKD.at[:, :, :L].set(kv.k_LNTKD[:, :, :L]).at[:, :, L:].set(123.0)
        v = cache.v_LNCKD.at[:, :, :L].set(kv.v_LNTKD[:, :, :L]).at[:, :, L:].set(-55.0)
        cache = KVCache(k, v, jnp.array([L]))
        group_T, slot_T = masks.decode_layout(B)
        drafts = seq[:, L:]
        step = jnp.where(group_T[None] == 0, drafts[:, slot_T % B], cfg.mask_token_id)
        step_mask = (masks.decode_mask(jnp.array([L]), B, C) if kernel == "reference"
                     else masks.decode_attention_layout(jnp.array([L]), B, C))
        logits, step_kv = apply(graphdef, state, step, masks.decode_positions(jnp.array([L]), B), step_mask, cache)
        np.testing.assert_allclose(np.asarray(logits[:, :B]), np.asarray(full[:, L:]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(step_kv.k_LNTKD[:, :, :B]), np.asarray(kv.k_LNTKD[:, :, L:]),
                                   rtol=0, atol=1e-12)
        # group j equals a forward over prefix + drafts[:j] + B masks, with the same (bidirectional) group mask
        for j in range(1, B + 1):
            toks = jnp.concatenate([seq[:, :L + j], jnp.full((1, B), cfg.mask_token_id)], axis=1)
            n = L + j
            m = np.zeros((1, n + B, n + B), bool)
            m[0, :n, :n] = np.tril(np.ones((n, n), bool))
            m[0, n:, :n] = True
            m[0, n:, n:] = True
            ref, _ = apply(graphdef, state, toks, jnp.arange(n + B)[None], jnp.asarray(m))
            np.testing.assert_allclose(np.asarray(logits[:, j * B:(j + 1) * B]), np.asarray(ref[:, n:]),
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["reference", "blockwise", "pallas_gpu"])
def test_prefill_layout_prompt_rows_equal_causal_forward(kernel):
    with jax.enable_x64(True), _kernel_context(kernel):
        cfg = tiny(attention=kernel)
        graphdef, state = model_fn(cfg, seed=10)
        P, B = 8, 4
        lens = jnp.array([8, 5])
        prompt = jax.random.randint(jax.random.key(11), (2, P), 0, VOCAB - 1)
        toks = jnp.concatenate([prompt, jnp.full((2, B), cfg.mask_token_id)], axis=1)
        layout = masks.prefill_mask(lens, P, B) if kernel == "reference" else masks.prefill_layout(lens, P, B)
        logits, _ = apply(graphdef, state, toks, masks.prefill_positions(lens, P, B), layout)
        for row, L in enumerate([8, 5]):
            ref, _ = apply(graphdef, state, prompt[row:row + 1, :L], jnp.arange(L)[None], causal_mask(1, L))
            np.testing.assert_allclose(np.asarray(logits[row, :L]), np.asarray(ref[0]), rtol=0, atol=1e-12)
            # the B masks = a forward of [real prompt | B masks] alone (padding is invisible)
            t = jnp.concatenate([prompt[row:row + 1, :L], jnp.full((1, B), cfg.mask_token_id)], 1)
            m = np.zeros((1, L + B, L + B), bool)
            m[0, :L, :L] = np.tril(np.ones((L, L), bool))
            m[0, L:, :] = True
            pos = jnp.concatenate([jnp.arange(L), L + jnp.arange(B)])[None]
            ref2, _ = apply(graphdef, state, t, pos, jnp.asarray(m))
            np.testing.assert_allclose(np.asarray(logits[row, P:]), np.asarray(ref2[0, L:]), rtol=0, atol=1e-12)


def test_sharded_forward_equals_single_device():
    cfg = tiny(dtype="float32", **FAMILIES["qwen2"], num_heads=4, num_kv_heads=2)
    mesh = make_mesh(2, 2, 2)
    graphdef, sharded = create_sharded(cfg, mesh, seed=3)
    # parameters really are distributed
    q = sharded["layers"]["attn"]["q_proj"][...]  # stacked: [layers, embed, heads, head_dim]
    assert len({d for d in q.sharding.device_set}) == 8 and q.sharding.spec[1] == "fsdp"
    single = jax.device_put(sharded, jax.devices()[0])
    S, B, N = 8, 4, 4
    tokens = jax.random.randint(jax.random.key(0), (N, S), 0, VOCAB - 1)
    doubled = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_token_id)], 1)
    pos = jnp.broadcast_to(masks.training_positions(S), (N, 2 * S))
    mask = jnp.broadcast_to(masks.training_mask(S, B), (N, 2 * S, 2 * S))
    fwd = jax.jit(lambda st, t: apply(graphdef, st, t, pos, mask)[0])
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    out_mesh = fwd(sharded, jax.device_put(doubled, batch_sharding))
    out_one = fwd(single, doubled)
    np.testing.assert_allclose(np.asarray(out_mesh), np.asarray(out_one), rtol=1e-5, atol=1e-5)


def test_remat_gives_same_loss_and_grads():
    from tidar_jax.objective import tidar_loss
    cfg = tiny(dtype="float32")
    S, B = 8, 4
    tokens = jax.random.randint(jax.random.key(1), (2, S), 0, VOCAB - 1)
    doubled = jnp.concatenate([tokens, jnp.full_like(tokens, cfg.mask_token_id)], 1)
    pos = jnp.broadcast_to(masks.training_positions(S), (2, 2 * S))
    mask = jnp.broadcast_to(masks.training_mask(S, B), (2, 2 * S, 2 * S))
    out = []
    for remat in (False, True):
        graphdef, state = split(init_model(cfg, 0, remat=remat))
        loss = lambda st: tidar_loss(apply(graphdef, st, doubled, pos, mask)[0], tokens)[0]
        out.append(jax.jit(jax.value_and_grad(loss))(state))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out[0][1], out[1][1])
