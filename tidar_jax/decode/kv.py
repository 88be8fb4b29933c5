"""Committing step K/V into the fixed-size cache.

The model only reads the cache. Here the caller writes the first ``count`` current tokens' K/V at each row's
slots ``length .. length+count-1``. Writes use scatter with ``mode="drop"``: an out-of-range slot is dropped,
never clamped onto valid slots (``dynamic_update_slice`` would clamp the start index and silently overwrite
committed K/V). Callers size the cache so that nothing visible is ever dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tidar_jax.model import KVCache, StepKV, gpu_step, tpu_step


def write_slots(cache_LNCKD, new_LNTKD, start_N):
    n, t = new_LNTKD.shape[1], new_LNTKD.shape[2]
    rows_N1 = jnp.arange(n)[:, None]
    slots_NT = start_N[:, None] + jnp.arange(t)[None, :]
    return cache_LNCKD.at[:, rows_N1, slots_NT].set(new_LNTKD.astype(cache_LNCKD.dtype), mode="drop")


def after(step_kv: StepKV, dependency) -> StepKV:
    """``step_kv``, made to wait for ``dependency`` (a value computed from the step's logits) where the platform
    needs it: the lean GPU decode step's ``order_cache_write`` (``tidar_jax.model.gpu_step``) and the TPU step's
    ``cache_write_after_reads`` (``tidar_jax.model.tpu_step``). The write updates the donated cache in place, which
    XLA may only do after every kernel that reads the cache; otherwise it keeps the old cache alive and copies it."""
    if tpu_step.cache_write_after_reads():
        return jax.lax.optimization_barrier((step_kv, dependency))[0]
    return gpu_step.after(gpu_step.for_forward(reads_cache=True), step_kv, dependency)


def write_tokens(cache: KVCache, step_kv: StepKV, count: int, start_N) -> KVCache:
    """Write the K/V of current tokens ``0..count-1`` at slots ``start_N..`` (lengths unchanged)."""
    k = write_slots(cache.k_LNCKD, step_kv.k_LNTKD[:, :, :count], start_N)
    v = write_slots(cache.v_LNCKD, step_kv.v_LNTKD[:, :, :count], start_N)
    return KVCache(k, v, cache.length_N)


def prefill_cache(empty: KVCache, step_kv: StepKV, prompt_len_N, padded_len: int) -> KVCache:
    """Cache holding the prompt K/V at slots 0..P-1; only the first ``prompt_len`` of each row are visible."""
    zeros_N = jnp.zeros_like(prompt_len_N)
    cache = write_tokens(empty, step_kv, padded_len, zeros_N)
    return KVCache(cache.k_LNCKD, cache.v_LNCKD, prompt_len_N.astype(jnp.int32))


def advance(cache: KVCache, accepted_N) -> KVCache:
    return KVCache(cache.k_LNCKD, cache.v_LNCKD, cache.length_N + accepted_N.astype(jnp.int32))
