"""Attention kernels against the reference kernel (outputs and gradients), the blockwise tile schedule against a
brute-force evaluation of the plain-Python masks, and the structural memory check of the blockwise train step."""

from __future__ import annotations

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reference import training_mask_ref
from tidar_jax import attention, masks
from tidar_jax.attention import blockwise, cudnn, reference, splash
from tidar_jax.attention.schedule import tile_classes
from tidar_jax.config import ConfigError, ModelConfig
from kernel_cases import assert_close, random_inputs, random_segments, value_and_grads

H, KV, D = 4, 2, 8  # GQA: two query heads per kv head


def _inputs(layout, n, dtype, seed=0, heads=H, kv_heads=KV, d=D):
    return random_inputs(layout, n, dtype, seed, heads, kv_heads, d)


def _blockwise(tile):
    return lambda q, k, v, lay: blockwise.attend(q, k, v, lay, tile_q=tile, tile_k=tile)


# (name, layout builder, batch, tile): S not a multiple of the tile in most cases
def _case(name, make, n, tile, slow=False):
    return pytest.param(make, n, tile, id=name, marks=[pytest.mark.slow] if slow else [])


CASES = [
    _case("train-S12-B4-t5", lambda: masks.training_layout(12, 4), 2, 5),
    _case("train-S16-B4-t8", lambda: masks.training_layout(16, 4), 1, 8, slow=True),
    _case("train-S24-B8-t7", lambda: masks.training_layout(24, 8), 1, 7, slow=True),
    _case("train-seg-S16-B4-t6", lambda: masks.training_layout(16, 4, random_segments(2, 16, 1)), 2, 6),
    _case("causal-S13-t4", lambda: masks.causal_layout(13), 2, 4, slow=True),
    _case("prefill-P9-B3-t5", lambda: masks.prefill_layout(jnp.array([9, 4]), 9, 3), 2, 5),
    _case("decode-B3-C10-t7", lambda: masks.decode_attention_layout(jnp.array([0, 6]), 3, 10), 2, 7),
    _case("ar-decode-C9-t4", lambda: masks.decode_attention_layout(jnp.array([3, 9]), 1, 9, groups=False), 2, 4,
          slow=True),
]


@pytest.mark.parametrize("make,n,tile", CASES)
def test_blockwise_equals_reference_fp32(make, n, tile):
    layout = make()
    q, k, v, w = _inputs(layout, n, jnp.float32)
    assert_close(value_and_grads(_blockwise(tile), layout, q, k, v, w),
                 value_and_grads(reference.attend, layout, q, k, v, w), 1e-5, relative_grad_atol=False)


def test_blockwise_equals_reference_bf16():
    """bf16 inputs: the blockwise error against a float32 reference on the same (rounded) inputs stays within
    2x the reference kernel's own bf16 error plus 1e-2 (outputs) / 2e-2 x max|grad| (gradients)."""
    layout = masks.training_layout(16, 4, random_segments(2, 16, 3))
    q, k, v, w = _inputs(layout, 2, jnp.bfloat16, seed=2)
    exact_out, exact_g = value_and_grads(reference.attend, layout, *(x.astype(jnp.float32) for x in (q, k, v)), w)
    ref_out, ref_g = value_and_grads(reference.attend, layout, q, k, v, w)
    bw_out, bw_g = value_and_grads(_blockwise(6), layout, q, k, v, w)
    assert bw_out.dtype == jnp.bfloat16

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    assert err(bw_out, exact_out) <= 2 * err(ref_out, exact_out) + 1e-2
    for bw, rf, ex in zip(bw_g, ref_g, exact_g):
        scale = float(jnp.max(jnp.abs(ex)))
        assert err(bw, ex) <= 2 * err(rf, ex) + 2e-2 * scale


@pytest.mark.slow
def test_blockwise_gqa_one_kv_head_and_mha():
    layout = masks.training_layout(8, 2)
    for kv_heads in (1, 4):
        q, k, v, w = _inputs(layout, 1, jnp.float32, seed=kv_heads, kv_heads=kv_heads)
        assert_close(value_and_grads(_blockwise(4), layout, q, k, v, w),
                     value_and_grads(reference.attend, layout, q, k, v, w), 1e-5, relative_grad_atol=False)


# ----------------------------------------------------------------------------------------------------------------
# Tile schedule
# ----------------------------------------------------------------------------------------------------------------

def _brute_tiles(dense_TS, tile_q, tile_k):
    """(nonempty, full) per tile of a dense [T][S] list-of-lists mask, padded with disallowed entries."""
    t, s = len(dense_TS), len(dense_TS[0])
    nq, nk = -(-t // tile_q), -(-s // tile_k)
    nonempty = np.zeros((nq, nk), bool)
    full = np.ones((nq, nk), bool)
    for qi in range(nq):
        for ki in range(nk):
            for q in range(qi * tile_q, min((qi + 1) * tile_q, t)):
                for k in range(ki * tile_k, (ki + 1) * tile_k):
                    allowed = k < s and dense_TS[q][k]
                    nonempty[qi, ki] |= allowed
                    full[qi, ki] &= allowed
    return nonempty, full


@pytest.mark.parametrize("S,B,tq,tk", [(8, 2, 4, 4), (12, 4, 5, 3), (16, 4, 6, 6), (16, 8, 16, 5), (6, 3, 2, 7)])
def test_tile_schedule_matches_brute_force(S, B, tq, tk):
    nonempty, full = tile_classes(masks.training_layout(S, B), tq, tk)
    want_nonempty, want_full = _brute_tiles(training_mask_ref(S, B), tq, tk)
    np.testing.assert_array_equal(nonempty, want_nonempty)
    np.testing.assert_array_equal(full, want_full)


def test_tile_schedule_with_traced_data_is_a_superset_and_never_full():
    """Segments, prompt lengths and cache lengths only remove entries: every allowed entry of every row lies in a
    visited tile, and no tile is treated as full (the mask is evaluated in each visited tile)."""
    # numpy row data: the layouts then evaluate their dense masks in numpy (fast, eager)
    layouts = [masks.TrainingLayout(16, 4, np.asarray(random_segments(3, 16, 5))),
               masks.PrefillLayout(np.array([1, 6, 9]), 9, 3),
               masks.DecodeLayout(np.array([0, 4, 10]), 3, 10)]
    for layout in layouts:
        nonempty, full = tile_classes(layout, 5, 4)
        assert not full.any()
        dense = np.asarray(layout.block())  # [N, T, S]
        nq, nk = nonempty.shape
        padded = np.zeros((dense.shape[0], nq * 5, nk * 4), bool)
        padded[:, :dense.shape[1], :dense.shape[2]] = dense
        per_tile = padded.reshape(-1, nq, 5, nk, 4).any(axis=(0, 2, 4))
        assert not (per_tile & ~nonempty).any()
        assert nonempty.sum() < nonempty.size  # something is really skipped


def test_visited_fraction_at_paper_shape():
    """S=4096, B=16, 128x128 tiles: 26.6% of the tiles of the doubled sequence (kernels.md, measured)."""
    sched = blockwise.schedule_for(masks.training_layout(4096, 16), 8192, 8192, 128, 128)
    assert round(100 * sched.visited_fraction, 1) == 26.6
    assert len(sched.full_pairs) > 10 * len(sched.partial_pairs)  # most visited tiles skip mask evaluation


# ----------------------------------------------------------------------------------------------------------------
# Interface and config
# ----------------------------------------------------------------------------------------------------------------

def test_config_field_validates_and_defaults():
    assert ModelConfig().attention == "auto"
    assert ModelConfig.from_dict({"vocab_size": 64, "mask_token_id": 1}).attention == "auto"  # old configs
    with pytest.raises(ConfigError, match="model.attention='flash': must be one of auto, reference, blockwise"):
        ModelConfig(attention="flash")


def test_resolve_per_backend():
    assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("auto", "gpu") == "pallas_gpu"
    assert attention.resolve("auto", "tpu") in ("splash", "blockwise")
    assert attention.resolve("reference") == "reference"


def test_train_config_override_reaches_model_config():
    from tidar_jax.train.config import load_config
    cfg = load_config(None, ["model.attention=reference"])
    assert cfg.model_config(mask_token_id=1).attention == "reference"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=dense"]).model_config(mask_token_id=1)


# ----------------------------------------------------------------------------------------------------------------
# Structure: no [T, S] attention array in the blockwise train step
# ----------------------------------------------------------------------------------------------------------------

def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _subjaxprs(v)


def _largest_intermediate(jaxpr, largest=(0, None, None)):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            size = int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0
            if size > largest[0]:
                largest = (size, var.aval.shape, eqn.primitive.name)
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                largest = _largest_intermediate(sub, largest)
    return largest


def _train_step_jaxpr(kernel, seq_len):
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.train.step import make_loss_fn

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=32,
                      mask_token_id=63, block_size=16, attention=kernel)
    graphdef, abstract = abstract_model(cfg)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    params = nnx.to_pure_dict(template)
    loss_fn = make_loss_fn(graphdef, template, cfg)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.make_jaxpr(jax.value_and_grad(loss_fn, has_aux=True))(params, tokens), cfg


def test_blockwise_train_step_has_no_quadratic_intermediate():
    """S=2048 (T=4096 doubled), one sequence, 2 heads: every intermediate of loss+grad (recursively through scan,
    custom_vjp and pjit sub-jaxprs) holds at most T*S/4 elements per sequence and head; the reference kernel's
    step does hold one (so the check can fail)."""
    s = 2048
    t = 2 * s
    limit = t * t // 4
    for kernel, expect_ok in (("blockwise", True), ("reference", False)):
        closed, cfg = _train_step_jaxpr(kernel, s)
        size, shape, prim = _largest_intermediate(closed.jaxpr)
        per_head = size / cfg.num_heads
        assert (per_head <= limit) == expect_ok, (kernel, size, shape, prim)


# ----------------------------------------------------------------------------------------------------------------
# splash (TPU kernel, run here with the Pallas interpreter) and cudnn (GPU; its bias checked through XLA on CPU)
# ----------------------------------------------------------------------------------------------------------------

SPLASH_D = 128  # splash's kv blocks are multiples of 128 lanes; head_dim 128 as on the real models


def _splash(q, k, v, lay):
    return splash.attend(q, k, v, lay, interpret=True)


SPLASH_CASES = [
    # S=96 -> T=192: not a multiple of the 128 block (padded queries and keys); documents via SegmentIds; GQA 2:1
    _case("train-seg-S96-B16", lambda: masks.training_layout(96, 16, random_segments(2, 96, 7)), 2, None),
    _case("train-S128-B16", lambda: masks.training_layout(128, 16), 1, None, slow=True),
    _case("decode-B3-C100", lambda: masks.decode_attention_layout(jnp.array([0, 70]), 3, 100), 2, None),
    _case("causal-seg-S100", lambda: masks.causal_layout(100, random_segments(1, 100, 9)), 1, None, slow=True),
]


@pytest.mark.parametrize("make,n,tile", SPLASH_CASES)
def test_splash_equals_reference_fp32(make, n, tile):
    """The real splash Pallas kernel (interpreted) against the reference, outputs and gradients, fp32."""
    layout = make()
    q, k, v, w = _inputs(layout, n, jnp.float32, seed=11, heads=2, kv_heads=1, d=SPLASH_D)
    assert_close(value_and_grads(_splash, layout, q, k, v, w),
                  value_and_grads(reference.attend, layout, q, k, v, w), 1e-5)


@pytest.mark.slow
def test_splash_equals_reference_bf16():
    """bf16: splash's error against a float32 reference stays within 2x the reference kernel's own bf16 error
    plus 1e-2 (outputs) / 2e-2 x max|grad| (gradients), as for blockwise."""
    layout = masks.training_layout(64, 16, random_segments(1, 64, 4))
    q, k, v, w = _inputs(layout, 1, jnp.bfloat16, seed=3, heads=2, kv_heads=1, d=SPLASH_D)
    exact_out, exact_g = value_and_grads(reference.attend, layout, *(x.astype(jnp.float32) for x in (q, k, v)), w)
    ref_out, ref_g = value_and_grads(reference.attend, layout, q, k, v, w)
    sp_out, sp_g = value_and_grads(_splash, layout, q, k, v, w)

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    assert err(sp_out, exact_out) <= 2 * err(ref_out, exact_out) + 1e-2
    for sp, rf, ex in zip(sp_g, ref_g, exact_g):
        assert err(sp, ex) <= 2 * err(rf, ex) + 2e-2 * float(jnp.max(jnp.abs(ex)))


def _splash_dense(layout, t_pad, s_pad):
    """What splash computes, in numpy: its computable mask on the padded grid AND-ed with its segment ids."""
    fn = splash._mask_function(layout.static_bound(), layout.q_len, layout.k_len)
    static_TS = fn(np.arange(t_pad)[:, None], np.arange(s_pad)[None, :])
    segs = splash._segments(layout, 3, layout.q_len, layout.k_len)
    if segs is None:
        return static_TS[None]
    seg_q, seg_kv = (np.asarray(x) for x in segs)
    seg_kv = np.pad(seg_kv, ((0, 0), (0, s_pad - layout.k_len)), constant_values=-1)
    seg_q = np.concatenate([seg_q, np.repeat(seg_kv[:, :1], t_pad - layout.q_len, axis=1)], axis=1)
    return static_TS[None] & (seg_q[:, :, None] == seg_kv[:, None, :])


@pytest.mark.parametrize("layout", [
    masks.TrainingLayout(24, 4, np.asarray(random_segments(3, 24, 2))),
    masks.TrainingLayout(24, 4),
    masks.CausalLayout(20, np.asarray(random_segments(3, 20, 6))),
    masks.DecodeLayout(np.array([0, 5, 11]), 3, 11),
    masks.DecodeLayout(np.array([0, 4, 9]), 1, 9, groups=False),
], ids=["train-seg", "train", "causal-seg", "decode", "ar-decode"])
def test_splash_mask_and_segments_reproduce_the_layout(layout):
    """Splash's static computable mask AND its segment ids equal the layout's own dense mask on the real rows
    (exactly, per row), padded keys are never allowed, and every padded query row is allowed something."""
    t_pad, s_pad = layout.q_len + 5, layout.k_len + 3
    got_NTS = _splash_dense(layout, t_pad, s_pad)
    want_NTS = np.broadcast_to(np.asarray(layout.block()), (got_NTS.shape[0], layout.q_len, layout.k_len))
    np.testing.assert_array_equal(got_NTS[:, :layout.q_len, :layout.k_len], want_NTS)
    assert not got_NTS[:, :, layout.k_len:].any()
    assert got_NTS[:, layout.q_len:].any(axis=-1).all()
    assert got_NTS.any(axis=-1).all()  # no empty row anywhere (splash's softmax would be 0/0)


def test_splash_prefill_falls_back_to_blockwise():
    """Prefill is not expressible as splash mask + segment ids (see splash.py): the blockwise result, forward only
    (blockwise's gradients are tested above)."""
    layout = masks.prefill_layout(jnp.array([9, 4]), 9, 3)
    q, k, v, _ = _inputs(layout, 2, jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(_splash)(q, k, v, layout)),
                               np.asarray(reference.attend(q, k, v, layout)), rtol=1e-5, atol=1e-5)


def test_splash_missing_module_is_one_clear_line(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.tpu.splash_attention", None)
    layout = masks.training_layout(8, 4)
    q, k, v, _ = _inputs(layout, 1, jnp.float32)
    with pytest.raises(splash.SplashUnavailable) as info:
        splash.attend(q, k, v, layout, interpret=True)
    msg = str(info.value)
    assert "\n" not in msg and "splash_attention" in msg and "use blockwise" in msg
    assert splash.unavailable_reason("tpu") == msg


# prefill's per-row bias path is the same as decode's: prefill runs with -m slow
CUDNN_XLA_CASES = [c if c.id != "prefill-P9-B3-t5" else pytest.param(*c.values, id=c.id, marks=[pytest.mark.slow])
                   for c in CASES if "slow" not in str(c.marks)]


@pytest.mark.parametrize("make,n,tile", CUDNN_XLA_CASES)
def test_cudnn_bias_through_xla_equals_reference(make, n, tile):
    """The cudnn kernel's bias and GQA call, run by ``implementation="xla"`` here: equals the reference."""
    layout = make()
    q, k, v, w = _inputs(layout, n, jnp.float32)
    xla = lambda q, k, v, lay: cudnn.attend(q, k, v, lay, implementation="xla")  # noqa: E731
    assert_close(value_and_grads(xla, layout, q, k, v, w),
                  value_and_grads(reference.attend, layout, q, k, v, w), 1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn runs on an NVIDIA GPU only (none here)")
@pytest.mark.parametrize("make,n,tile", [c for c in CASES if "slow" not in str(c.marks)])
def test_cudnn_equals_reference_bf16_on_gpu(make, n, tile):
    """cuDNN fused attention (bf16, head_dim 64) against a float32 reference on the same rounded inputs."""
    layout = make()
    q, k, v, w = _inputs(layout, n, jnp.bfloat16, d=64)
    exact = value_and_grads(reference.attend, layout, *(x.astype(jnp.float32) for x in (q, k, v)), w)
    got = value_and_grads(cudnn.attend, layout, q, k, v, w)
    assert_close((got[0].astype(jnp.float32), [g.astype(jnp.float32) for g in got[1]]), exact, 3e-2)


def test_unavailable_kernels_fail_with_one_line():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "pallas_gpu"
    assert attention.resolve("splash", "tpu") == "splash"
    assert attention.resolve("cudnn", "gpu") == "cudnn"
    with pytest.raises(ConfigError, match=r"^model.attention='splash' needs a TPU \(backend is cpu\)"):
        attention.resolve("splash", "cpu")
    with pytest.raises(ConfigError, match=r"^model.attention='cudnn' needs an NVIDIA GPU with cuDNN \(backend is "
                                          r"tpu\)"):
        attention.resolve("cudnn", "tpu")
