"""One attention interface over interchangeable kernels.

``attend(q_NTHD, k_NSKD, v_NSKD, layout, kernel)``: ``layout`` is a ``tidar_jax.masks`` layout object (or a dense
boolean ``[N|1, T, S]`` mask, which always runs the ``reference`` kernel); ``kernel`` is a ``model.attention``
value. Each kernel is a function ``(q_NTHD, k_NSKD, v_NSKD, layout) -> out_NTHD`` registered by name and derives
what it needs (dense mask, tile schedule, per-tile mask) from the layout.

Which kernel runs where (``auto`` per backend, for training and for decode cache attention) is decided in
``tidar_jax.attention.choice``, the one owner of both choices. A kernel that needs particular hardware
(``splash``: TPU, ``cudnn``/``pallas_gpu``: GPU) registers an ``unavailable(backend) -> reason | None`` check;
asking for it elsewhere raises one ``ConfigError`` line with the reason, and ``auto`` skips it. Their modules import
the hardware-specific JAX pieces lazily, so this package imports everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tidar_jax.attention import blockwise, cudnn, fused_cache, paged, pallas_gpu, reference, splash, tpu_cache
from tidar_jax.attention.choice import (CACHE_AUTO, KERNELS, TRAIN_AUTO, UNAVAILABLE, auto_preference, register,
                                        resolve, resolve_cache_attention)
from tidar_jax.masks import DecodeLayout, is_layout
from tidar_jax.targets import build_platform

register("reference", reference.attend)
register("blockwise", blockwise.attend)
register("splash", splash.attend, splash.unavailable_reason)
register("cudnn", cudnn.attend, cudnn.unavailable_reason)
register("pallas_gpu", pallas_gpu.attend, pallas_gpu.unavailable_reason)


def attend(q_NTHD, k_NSKD, v_NSKD, layout, kernel: str = "auto"):
    """Masked GQA attention ``[N, T, H, D]`` of ``q`` over ``k, v [N, S, K, D]`` with the chosen kernel."""
    if not is_layout(layout):  # a dense boolean mask: only the reference kernel reads one
        return reference.attend(q_NTHD, k_NSKD, v_NSKD, layout)
    return KERNELS[resolve(kernel)](q_NTHD, k_NSKD, v_NSKD, layout)


def attend_with_cache(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, kernel: str = "auto"):
    """Attention of a cached forward (a decode step): keys are layer ``layer`` of the whole ``[L, N, C, K, D]``
    cache followed by the current tokens' ``k, v [N, T, K, D]``. A ``DecodeLayout`` with ``cache_page > 0`` reads
    the cache in place up to the live length (its ``cache_kernel``: ``paged``, ``fused`` or ``tpu``); otherwise the
    layer's cache and the current keys are concatenated and attended with ``kernel`` (or the reference kernel for a
    dense boolean mask)."""
    if isinstance(layout, DecodeLayout) and layout.cache_page and layout.cache_kernel == "fused":
        # the GPU kernel; anywhere else it runs in Pallas interpret mode (the CPU tests of it)
        interpret = build_platform() != "gpu"
        return fused_cache.attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, interpret)
    if isinstance(layout, DecodeLayout) and layout.cache_page and layout.cache_kernel == "tpu":
        interpret = build_platform() != "tpu"  # the Mosaic kernel; Pallas TPU interpret mode elsewhere
        return tpu_cache.attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, interpret)
    if isinstance(layout, DecodeLayout) and layout.cache_page:
        return paged.attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout)
    dt = k_NTKD.dtype
    keys = jnp.concatenate([jax.lax.dynamic_index_in_dim(cache_k_LNCKD, layer, 0, keepdims=False).astype(dt),
                            k_NTKD], axis=1)
    values = jnp.concatenate([jax.lax.dynamic_index_in_dim(cache_v_LNCKD, layer, 0, keepdims=False).astype(dt),
                              v_NTKD], axis=1)
    return attend(q_NTHD, keys, values, layout, kernel)


__all__ = ["CACHE_AUTO", "KERNELS", "TRAIN_AUTO", "UNAVAILABLE", "attend", "attend_with_cache", "auto_preference",
           "register", "resolve", "resolve_cache_attention"]
