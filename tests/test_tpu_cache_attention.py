"""The TPU decode-step cache attention (``tidar_jax.attention.tpu_cache``, Pallas TPU interpret mode here): equal
to the reference in float64 (ragged lengths incl. 0 and the whole cache, GQA, pruned groups, the AR step, batch > 1,
a partial last cache block, garbage past each row's live length) under both of Pallas' interpreters; greedy TiDAR
with it == greedy AR; and compiled for a TPU v5e, a program with no ``while`` loop that hands the allocated cache
to the kernel in place (no slice, copy or prefetch of it outside the kernel)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decode_support import pattern_prompts, trained_decoder
from tidar_jax import attention, masks, targets
from tidar_jax.attention import tpu_cache


def _case(cache_size, lengths, block, counts, groups=True, h=4, kv=2, d=8, n_layers=3, dtype=jnp.float64):
    """Inputs of one decode step: a dense layout for the reference, a ``tpu`` one for the kernel, and a cache
    whose slots past each row's live length hold NaN (a kernel must never weigh them, not even by 0 * NaN)."""
    length_N = jnp.asarray(lengths, jnp.int32)
    kw = dict(counts=counts, groups=groups)
    dense = masks.decode_attention_layout(length_N, block, cache_size, **kw)
    tpu = masks.decode_attention_layout(length_N, block, cache_size, cache_page=128, cache_kernel="tpu", **kw)
    t, n = dense.q_len, len(lengths)
    ks = jax.random.split(jax.random.key(cache_size + block), 5)
    q = jax.random.normal(ks[0], (n, t, h, d), dtype)
    k = jax.random.normal(ks[1], (n, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (n, t, kv, d), dtype)
    live = (jnp.arange(cache_size)[None] < length_N[:, None])[None, :, :, None, None]
    ck = jnp.where(live, jax.random.normal(ks[3], (n_layers, n, cache_size, kv, d), dtype), jnp.nan)
    cv = jnp.where(live, jax.random.normal(ks[4], (n_layers, n, cache_size, kv, d), dtype), jnp.nan)
    layer = jnp.int32(n_layers - 1)
    wide = lambda x: jnp.nan_to_num(x).astype(jnp.float64)  # noqa: E731  (the reference in float64)
    want = attention.attend_with_cache(wide(q), wide(k), wide(v), wide(ck), wide(cv), layer, dense, "reference")
    return (q, k, v, ck, cv, layer), tpu, want


# two cache blocks (150 = 128 + a partial 22) with pruned groups: a row of 0 slots, the whole cache, one that stops
# in the first block (its second is a clamped repeat that does no work) and one that crosses into the second;
# slow: one block with every group; blocks of 256 (300 = 256 + 44); the AR step (one token, no groups), GQA 3:1
CASES = [(150, [0, 150, 7, 129], 3, (1, 3), True, 4),
         pytest.param(30, [0, 30, 7, 24], 3, None, True, 4, marks=pytest.mark.slow),
         pytest.param(300, [300, 129, 0, 255], 3, (2,), True, 4, marks=pytest.mark.slow),
         pytest.param(40, [1, 40, 0], 1, None, False, 6, marks=pytest.mark.slow)]


@pytest.mark.parametrize("cache_size,lengths,block,counts,groups,heads", CASES)
def test_tpu_cache_equals_reference_through_the_interface(cache_size, lengths, block, counts, groups, heads):
    """Through ``attention.attend_with_cache`` (``cache_kernel="tpu"``: interpret mode off a TPU), under jit."""
    with jax.enable_x64(True):
        args, layout, want = _case(cache_size, lengths, block, counts, groups, h=heads)
        assert (tpu_cache.tiling(cache_size)["blocks"] > 1) == (cache_size > 128)
        got = jax.jit(attention.attend_with_cache)(*args, layout)  # the layout is a pytree: lengths traced
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_tpu_cache_equals_reference_in_the_tpu_interpreter():
    """Under Pallas' TPU interpreter (``pltpu.InterpretParams``: TPU memory spaces, scalar prefetch into SMEM,
    the pipeline's DMAs, out-of-bounds reads raise), the kernel on two blocks of 256. float32 (its host
    callbacks hand back float32 scratch under x64), against a reference in float64."""
    from jax.experimental.pallas import tpu as pltpu

    with jax.enable_x64(True):
        args, layout, want = _case(300, [300, 129, 0, 255], 3, (2,), True, dtype=jnp.float32)
    interpret = pltpu.InterpretParams(out_of_bounds_reads="raise")
    got = jax.jit(lambda *a: tpu_cache.attend(*a, layout, interpret=interpret))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)


def test_tpu_cache_decode_is_lossless_with_pruned_groups():
    """Greedy TiDAR with the TPU kernel (interpret mode) emits exactly greedy AR's tokens (float64)."""
    with jax.enable_x64(True):
        dec = trained_decoder("float64")
        prompts = pattern_prompts([5, 9], seed=8)
        ar = dec.generate(prompts, mode="ar", max_new_tokens=10, cache_attention="dense")
        td = dec.generate(prompts, mode="tidar", block_size=4, groups=(1, 3), max_new_tokens=10,
                          cache_attention="tpu")
        assert td.tokens == ar.tokens
        assert td.stats["mean_accepted"] > 1  # drafts were really accepted: the step's own part is exercised



def test_compiled_v5e_kernel_has_no_loop_and_reads_the_cache_in_place(v5e_devices):
    """The kernel alone (a TiDAR B=16 step: 272 tokens, the 1.5B model's 12 query and 2 KV heads of 128, a bf16
    cache of 1024 slots: two blocks) compiled for one v5e chip: one Mosaic call, no ``while``, and the whole cache
    parameters are its operands. At this shape XLA's memory-space assignment would otherwise copy the cache into
    VMEM before the kernel (the whole allocated cache, every step)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(v5e_devices[:1]), ("x",))
    n, n_layers, c, h, kv, d = 1, 4, 1024, 12, 2, 128
    layout = masks.decode_attention_layout(jnp.zeros((n,), jnp.int32), 16, c, cache_page=128, cache_kernel="tpu")
    t = layout.q_len
    whole = NamedSharding(mesh, PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=whole)  # noqa: E731
    args = (spec((n, t, h, d), jnp.bfloat16), spec((n, t, kv, d), jnp.bfloat16), spec((n, t, kv, d), jnp.bfloat16),
            spec((n_layers, n, c, kv, d), jnp.bfloat16), spec((n_layers, n, c, kv, d), jnp.bfloat16),
            spec((), jnp.int32), spec((n,), jnp.int32))

    def step(q, k, v, ck, cv, layer, length_N):
        return tpu_cache.cached_attention(q, k, v, ck, cv, layer, length_N, tpu_cache.local_rule(layout))

    # the mesh names the chip for Mosaic's lowering (jax asks the abstract mesh, not the CPU backend)
    with targets.compiling_for("tpu"), jax.set_mesh(mesh):
        hlo = jax.jit(step).lower(*args).compile().as_text()
    assert " while(" not in hlo
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 1 and "tpu_cache_attention" in calls[0]
    for name in ("ck", "cv"):
        param = re.search(rf"%({name}[.\w]*) = \S+ parameter\(", hlo).group(1)
        users = [line for line in hlo.splitlines() if re.search(rf"%{re.escape(param)}\b", line)
                 and "parameter(" not in line]
        assert users == calls, users


@pytest.mark.parametrize("mode", ["ar", pytest.param("tidar", marks=pytest.mark.slow)])
def test_compiled_v5e_decode_step_has_no_loop(v5e_devices, mode):
    """A small model's decode step (the engine's, per-layer weights) compiled for one v5e chip with
    ``cache_attention="tpu"`` has no loop; with ``paged`` it has one with a data-dependent trip count per
    layer."""
    from tidar_jax.config import ModelConfig
    from tidar_jax.analysis.decode_plan import compile_decode

    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128,
                      mlp_size=256, dtype="bfloat16", param_dtype="bfloat16", mask_token_id=1, block_size=4)
    steps = {}
    for kind in ("tpu", "paged"):  # compile_decode names the chip for Mosaic's lowering (the target's mesh)
        programs = compile_decode(cfg, v5e_devices[:1], batch=2, block_size=4, context=256, max_new_tokens=32,
                                  cache_page=128, modes=(mode,), cache_attention=kind, with_prefill=False)
        steps[kind] = programs[f"{mode} step"].program
    assert steps["tpu"].loops() == []
    assert len([lp for lp in steps["paged"].loops() if lp.dynamic]) == cfg.num_layers
