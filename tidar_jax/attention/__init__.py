"""One attention interface over interchangeable kernels.

``attend(q_NTHD, k_NSKD, v_NSKD, layout, kernel)``: ``layout`` is a ``tidar_jax.masks`` layout object (or a dense
boolean ``[N|1, T, S]`` mask, which always runs the ``reference`` kernel); ``kernel`` is a ``model.attention``
value. Each kernel is a function ``(q_NTHD, k_NSKD, v_NSKD, layout) -> out_NTHD`` registered by name and derives
what it needs (dense mask, tile schedule, per-tile mask) from the layout.

``auto`` resolves per backend to the first usable kernel of ``AUTO_PREFERENCE``; on a GPU, of the ranking
``gpu_choice`` gives for the chip (its recorded table, else a fixed order). A kernel that needs particular
hardware (``splash``: TPU, ``cudnn``: GPU) registers an ``unavailable(backend) -> reason | None`` check; asking for
it elsewhere raises one ``ConfigError`` line with the reason, and ``auto`` skips it. Their modules import the
hardware-specific JAX pieces lazily, so this package imports everywhere.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tidar_jax.attention import (blockwise, cudnn, fused_cache, gpu_choice, paged, pallas_gpu, reference, splash,
                                 tpu_cache)
from tidar_jax.config import ATTENTION_KERNELS, ConfigError
from tidar_jax.masks import DecodeLayout, is_layout
from tidar_jax.targets import build_chip, build_platform, platform_kind

KERNELS: dict[str, Callable] = {}
UNAVAILABLE: dict[str, Callable[[str], str | None]] = {}

# TPU and CPU; on GPU the order is ``gpu_choice``'s (per chip). ``blockwise`` always runs, so it closes every order.
AUTO_PREFERENCE = {"tpu": ("splash", "blockwise"), "cpu": ("blockwise",)}
# Decode-step cache attention (``DecodeOptions.cache_attention``), the one owner of its ``auto``: on GPU and TPU
# one fixed-shape kernel per layer (``fused``: split-K Pallas Triton; ``tpu``: Pallas Mosaic), since ``paged``'s
# while loop over live pages is a data-dependent loop in the step (on XLA:GPU it copies its predicate to the host
# every page); on CPU ``paged`` (a loop iteration costs nothing extra there and it reads only live pages; the
# Pallas kernels would run in interpret mode).
CACHE_AUTO = {"gpu": "fused", "tpu": "tpu", "cpu": "paged"}


def register(name: str, fn: Callable, unavailable: Callable[[str], str | None] | None = None) -> None:
    """Make ``fn(q_NTHD, k_NSKD, v_NSKD, layout) -> out_NTHD`` available as ``model.attention=name``;
    ``unavailable(backend)`` returns why it cannot run on that backend (None when it can)."""
    if name not in ATTENTION_KERNELS or name == "auto":
        raise ValueError(f"kernel name {name!r}: must be one of {', '.join(ATTENTION_KERNELS[1:])}")
    KERNELS[name] = fn
    if unavailable is not None:
        UNAVAILABLE[name] = unavailable


register("reference", reference.attend)
register("blockwise", blockwise.attend)
register("splash", splash.attend, splash.unavailable_reason)
register("cudnn", cudnn.attend, cudnn.unavailable_reason)
register("pallas_gpu", pallas_gpu.attend, pallas_gpu.unavailable_reason)


def resolve(kernel: str, backend: str | None = None) -> str:
    """The registered kernel name that ``kernel`` means on ``backend`` (default: the platform being built for,
    ``tidar_jax.targets.build_platform()``: jax's default backend, or a deviceless target's platform)."""
    kind = platform_kind(backend or build_platform())
    if kernel == "auto":
        prefs = auto_preference(kind)
        return next(name for name in prefs + ("blockwise",) if name in KERNELS and _reason(name, kind) is None)
    if kernel not in KERNELS:
        if kernel in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention={kernel!r}: not available in this build; available: auto, "
                              f"{', '.join(sorted(KERNELS))}")
        raise ConfigError(f"model.attention={kernel!r}: must be one of {', '.join(ATTENTION_KERNELS)}")
    reason = _reason(kernel, kind)
    if reason is not None:
        raise ConfigError(reason)
    return kernel


def auto_preference(kind: str) -> tuple[str, ...]:
    """The kernels ``auto`` tries, in order, on backend ``kind`` ("gpu", "tpu", "cpu") for the chip being built
    for; ``gpu_choice.preference`` says where a GPU order comes from."""
    if kind == "gpu":
        return gpu_choice.preference(build_chip())[0]
    return AUTO_PREFERENCE.get(kind, ("blockwise",))


def resolve_cache_attention(name: str, backend: str | None = None) -> str:
    """The decode cache attention that ``name`` ("auto", "paged", "fused", "tpu", "dense") means on ``backend``
    (default: the platform being built for)."""
    if name != "auto":
        return name
    return CACHE_AUTO.get(platform_kind(backend or build_platform()), "paged")


def _reason(name: str, kind: str) -> str | None:
    check = UNAVAILABLE.get(name)
    return None if check is None else check(kind)


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


__all__ = ["AUTO_PREFERENCE", "CACHE_AUTO", "KERNELS", "UNAVAILABLE", "attend", "auto_preference", "attend_with_cache", "register",
           "resolve", "resolve_cache_attention"]
