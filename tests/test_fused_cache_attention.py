"""The GPU decode-step cache attention (``tidar_jax.attention.fused_cache``, Pallas interpret mode here):
equal to the reference through the attention interface (ragged lengths, GQA, pruned groups, several splits, a
clamped last key block, garbage past each row's live length); lossless TiDAR == AR and sampling unchanged with it
in the decoder; and on the program compiled for an H100, a decode step with no data-dependent loop and no
device-to-host round trip, which the ``paged`` step fails."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decode_support import pattern_prompts, random_tiny, tiny_config, trained_decoder
from tidar_jax import attention, masks, targets
from tidar_jax.attention import fused_cache


@pytest.mark.parametrize("cache_size,lengths,counts,one_split", [
    (30, [0, 30, 7, 24], (1, 3), False), (16, [0, 16, 5], (2,), True),
    pytest.param(300, [300, 129, 1, 255], None, False, marks=pytest.mark.slow)])
def test_fused_equals_reference_through_the_interface(cache_size, lengths, counts, one_split):
    with jax.enable_x64(True):
        block, n_layers, h, kv, d = 3, 3, 4, 2, 8
        length_N = jnp.asarray(lengths, jnp.int32)
        dense = masks.decode_attention_layout(length_N, block, cache_size, counts=counts)
        fused = masks.decode_attention_layout(length_N, block, cache_size, counts=counts, cache_page=128,
                                              cache_kernel="fused")
        t, n = dense.q_len, len(lengths)
        tiles = fused_cache.tiling(n, kv, t * h // kv, cache_size)
        # the log-sum-exp merge over splits is exercised, or the kernel's own normalisation with one split
        assert (tiles["splits"] == 1) == one_split
        ks = jax.random.split(jax.random.key(cache_size), 5)
        q = jax.random.normal(ks[0], (n, t, h, d), jnp.float64)
        k = jax.random.normal(ks[1], (n, t, kv, d), jnp.float64)
        v = jax.random.normal(ks[2], (n, t, kv, d), jnp.float64)
        live_NC = (jnp.arange(cache_size)[None] < length_N[:, None])[None, :, :, None, None]
        # slots past a row's live length hold garbage the kernel must never weigh (not even by 0 * NaN)
        ck = jnp.where(live_NC, jax.random.normal(ks[3], (n_layers, n, cache_size, kv, d), jnp.float64), jnp.nan)
        cv = jnp.where(live_NC, jax.random.normal(ks[4], (n_layers, n, cache_size, kv, d), jnp.float64), jnp.nan)
        layer = jnp.int32(2)
        want = attention.attend_with_cache(q, k, v, jnp.nan_to_num(ck), jnp.nan_to_num(cv), layer, dense,
                                           "reference")
        got = jax.jit(attention.attend_with_cache, static_argnums=(7,))(q, k, v, ck, cv, layer, fused, "auto")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def test_auto_is_fused_on_gpu_and_paged_elsewhere():
    assert attention.resolve_cache_attention("auto", "gpu") == "fused"
    assert attention.resolve_cache_attention("auto", "cuda") == "fused"
    assert attention.resolve_cache_attention("auto", "cpu") == "paged"
    assert attention.resolve_cache_attention("auto", "tpu") == "tpu"
    assert attention.resolve_cache_attention("dense", "gpu") == "dense"


def test_fused_decode_is_lossless_with_pruned_groups():
    """Greedy TiDAR with the fused kernel (interpret mode) emits exactly greedy AR's tokens (float64)."""
    with jax.enable_x64(True):
        dec = trained_decoder("float64")
        prompts = pattern_prompts([5, 9], seed=8)
        ar = dec.generate(prompts, mode="ar", max_new_tokens=10, cache_attention="dense")
        td = dec.generate(prompts, mode="tidar", block_size=4, groups=(1, 3), max_new_tokens=10,
                          cache_attention="fused")
        assert td.tokens == ar.tokens
        assert td.stats["mean_accepted"] > 1  # drafts were really accepted: the step's own part is exercised


def test_fused_sampling_equals_paged():
    """With the same seed, sampled TiDAR emits the same tokens through the fused and the paged kernel
    (float64): the sampling that test_decode_sampling proves exact is unchanged by the kernel."""
    from tidar_jax.decode import Decoder

    with jax.enable_x64(True):
        dec = Decoder.from_model(random_tiny("float64", seed=11, scale=4.0))
        prompts = [[3, 5, 7, 2], [4, 4, 4, 9, 8]]
        kw = dict(mode="tidar", block_size=4, temperature=1.0, max_new_tokens=8, seed=5)
        paged = dec.generate(prompts, cache_attention="paged", **kw)
        fused = dec.generate(prompts, cache_attention="fused", **kw)
        assert fused.tokens == paged.tokens


@pytest.mark.parametrize("mode", ["ar", pytest.param("tidar", marks=pytest.mark.slow)])
def test_compiled_h100_step_has_no_dynamic_loop_nor_host_round_trip(h100_devices, mode, tmp_path):
    """A small model's decode step (the Decoder's engine.step, per-layer weights, donated state) compiled for an
    H100: with ``auto`` (the fused kernel) no ``while`` has a data-dependent trip count, no device-to-host
    transfer happens inside the step, and XLA:GPU puts the whole step in one command buffer (CUDA graph); with
    ``paged`` the loops and round trips happen, once per layer, and the loops run outside command buffers."""
    from tidar_jax.analysis.thunks import read_dump
    from tidar_jax.analysis.decode_plan import compile_decode

    cfg = tiny_config(dtype="bfloat16", param_dtype="bfloat16", num_layers=2)
    steps, graphs = {}, {}
    for kind in ("auto", "paged"):
        programs = compile_decode(cfg, h100_devices, batch=2, block_size=4, context=64, max_new_tokens=16,
                                  cache_page=16, modes=(mode,), cache_attention=kind,
                                  with_prefill=False, step_compiler_options={"xla_dump_to": str(tmp_path / kind)})
        steps[kind] = programs[f"{mode} step"].program
        graphs[kind] = read_dump(str(tmp_path / kind), "step")
    fused, paged = steps["auto"], steps["paged"]
    assert not [lp for lp in fused.loops() if lp.dynamic]
    assert fused.host_round_trips(dynamic_trips=4) == 0
    assert any("triton" in k.kind for k in fused.kernels())  # the Pallas kernel is in the program
    assert len([lp for lp in paged.loops() if lp.dynamic]) == cfg.num_layers
    assert paged.host_round_trips(dynamic_trips=4) > 0
    assert graphs["auto"].top_level == ("kCommandBuffer",)
    assert graphs["auto"].in_command_buffers >= len(fused.kernels()) - 2  # XLA may elide or add a copy thunk
    assert graphs["paged"].top_level.count("kWhile") == cfg.num_layers
    # the cost model charges the fused kernel for one layer's live slots when it is told the live length
    # (2 rows x 2 KV heads x 16 dims x 2 bytes per slot, K and V), and an in-graph launch cost when asked
    from tidar_jax.analysis import cost_model

    chip = targets.CHIPS["h100"]
    whole = cost_model.estimate(fused, chip)
    live = cost_model.estimate(fused, chip, live_cache_slots=64)
    calls = [k for k in fused.kernels() if cost_model.fused_cache_unread_bytes(fused, k, 64) > 0]
    assert len(calls) == cfg.num_layers
    from tidar_jax.analysis.hlo import array_shapes

    slots = next(dims[2] for t in fused.operand_types(calls[0]) for _, dims in array_shapes(t) if len(dims) == 5)
    per_call = 2 * (cfg.num_layers * slots - 64) * 2 * cfg.head_dim * 2 * 2
    assert whole.bytes - live.bytes == pytest.approx(cfg.num_layers * per_call)
    # its FLOPs: every padded query row (T tokens x R heads per KV head) against the live slots plus the step's U
    # keys, counted here from the kernel's tiling, not from the name it declares
    from tidar_jax.attention.fused_cache import tiling

    t = 1 if mode == "ar" else 4 * (1 + 4)
    rows = tiling(2, cfg.num_kv_heads, t * cfg.num_heads // cfg.num_kv_heads, slots)["m_pad"]
    per_slot = 4 * 2 * cfg.num_kv_heads * rows * cfg.head_dim
    u = max(16, 1 << (t - 1).bit_length())
    for c in calls:
        assert cost_model.kernel_flops(fused, c)[0] + cost_model.declared_cache_slot_flops(fused, c, 64) == \
            per_slot * (64 + u)
    assert whole.flops - live.flops == pytest.approx(cfg.num_layers * per_slot * (slots - 64))
    graph = cost_model.estimate(fused, chip, graph=True)
    assert graph.launch_time_s == pytest.approx(graph.launches * cost_model.GRAPH_LAUNCH_S)
    assert graph.time_s < whole.time_s


@pytest.mark.parametrize("family", [dict(qkv_bias=True), dict(qk_norm=True)])
@pytest.mark.parametrize("rows, tokens", [(1, 1), (2, 3)])
def test_gpu_step_forward_equals_the_cpu_forward(family, rows, tokens):
    """The model's forward over a cache as it is built for a GPU step (deferred RMSNorm factor, one norm for q
    and k heads, a padding row when the step is one token: the lean GPU decode step, ``tidar_jax.model.gpu_step``)
    equals the CPU forward in float64: hidden states and the step's K/V."""
    from tidar_jax.model import KVCache

    with jax.enable_x64(True):
        model = random_tiny("float64", seed=5, scale=3.0, attention="reference", **family)
        cfg = model.cfg
        rng = np.random.default_rng(0)
        c = 8
        cache = KVCache(jnp.asarray(rng.normal(size=(cfg.num_layers, rows, c, cfg.num_kv_heads, cfg.head_dim))),
                        jnp.asarray(rng.normal(size=(cfg.num_layers, rows, c, cfg.num_kv_heads, cfg.head_dim))),
                        jnp.full((rows,), 5, jnp.int32))
        tokens_NT = jnp.asarray(rng.integers(0, 20, size=(rows, tokens)), jnp.int32)
        positions_NT = 5 + jnp.broadcast_to(jnp.arange(tokens), (rows, tokens))
        mask_NTS = jnp.concatenate([jnp.broadcast_to(jnp.arange(c) < 5, (rows, tokens, c)),
                                    jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)),
                                                     (rows, tokens, tokens))], axis=-1)
        want_h, want_kv = jax.jit(lambda *a: model.hidden(*a))(tokens_NT, positions_NT, mask_NTS, cache)
        with targets.compiling_for("gpu"):  # traced (and so built) for a GPU, run here
            got_h, got_kv = jax.jit(lambda *a: model.hidden(*a))(tokens_NT, positions_NT, mask_NTS, cache)
        np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), rtol=1e-10, atol=1e-10)
        for got, want in zip(got_kv, want_kv):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [[[3, 5, 7, 2]], [[3, 5, 7, 2], [4, 4, 4, 9, 8]]])
def test_gpu_step_formulation_is_exact(prompts):
    """The decode step as it is built for a GPU (deferred RMSNorm factor, a padding row at batch 1: see
    the lean GPU decode step, ``tidar_jax.model.gpu_step``), run here on CPU with dense cache attention in float64:
    greedy AR emits the CPU program's tokens, and greedy TiDAR with pruned groups emits greedy AR's."""
    from tidar_jax.decode import Decoder

    with jax.enable_x64(True):
        model = random_tiny("float64", seed=3, scale=4.0, attention="reference")
        want = Decoder.from_model(model).generate(prompts, mode="ar", max_new_tokens=8, cache_attention="dense")
        with targets.compiling_for("gpu"):
            dec = Decoder.from_model(model)
            ar = dec.generate(prompts, mode="ar", max_new_tokens=8, cache_attention="dense")
            td = dec.generate(prompts, mode="tidar", block_size=4, groups=(1, 3), max_new_tokens=8,
                              cache_attention="dense")
        assert ar.tokens == want.tokens
        assert td.tokens == ar.tokens
