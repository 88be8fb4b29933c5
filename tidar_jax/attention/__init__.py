"""One attention interface over interchangeable kernels.

``attend(q_BTHD, k_BSKD, v_BSKD, layout, kernel)``: ``layout`` is a ``tidar_jax.masks`` layout object (or a dense
boolean ``[B|1, T, S]`` mask, which always runs the ``reference`` kernel); ``kernel`` is a ``model.attention``
value. Each kernel is a function ``(q_BTHD, k_BSKD, v_BSKD, layout) -> out_BTHD`` registered by name and derives
what it needs (dense mask, tile schedule, per-tile mask) from the layout.

``auto`` resolves per backend to the first registered kernel of ``AUTO_PREFERENCE``.
"""

from __future__ import annotations

from typing import Callable

import jax

from tidar_jax.attention import blockwise, reference
from tidar_jax.config import ATTENTION_KERNELS, ConfigError
from tidar_jax.masks import is_layout

KERNELS: dict[str, Callable] = {}

# ``splash`` (TPU) and ``cudnn`` (GPU) go first on their backends once registered.
AUTO_PREFERENCE = {"tpu": ("splash", "blockwise"), "gpu": ("blockwise",), "cpu": ("blockwise",)}


def register(name: str, fn: Callable) -> None:
    """Make ``fn(q_BTHD, k_BSKD, v_BSKD, layout) -> out_BTHD`` available as ``model.attention=name``."""
    if name not in ATTENTION_KERNELS or name == "auto":
        raise ValueError(f"kernel name {name!r}: must be one of {', '.join(ATTENTION_KERNELS[1:])}")
    KERNELS[name] = fn


register("reference", reference.attend)
register("blockwise", blockwise.attend)


def _backend_kind(backend: str) -> str:
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def resolve(kernel: str, backend: str | None = None) -> str:
    """The registered kernel name that ``kernel`` means on ``backend`` (default: JAX's default backend)."""
    if kernel == "auto":
        prefs = AUTO_PREFERENCE.get(_backend_kind(backend or jax.default_backend()), ("blockwise",))
        return next(name for name in prefs if name in KERNELS)
    if kernel not in KERNELS:
        if kernel in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention={kernel!r}: not available in this build; available: auto, "
                              f"{', '.join(sorted(KERNELS))}")
        raise ConfigError(f"model.attention={kernel!r}: must be one of {', '.join(ATTENTION_KERNELS)}")
    return kernel


def attend(q_BTHD, k_BSKD, v_BSKD, layout, kernel: str = "auto"):
    """Masked GQA attention ``[B, T, H, D]`` of ``q`` over ``k, v [B, S, K, D]`` with the chosen kernel."""
    if not is_layout(layout):  # a dense boolean mask: only the reference kernel reads one
        return reference.attend(q_BTHD, k_BSKD, v_BSKD, layout)
    return KERNELS[resolve(kernel)](q_BTHD, k_BSKD, v_BSKD, layout)


__all__ = ["AUTO_PREFERENCE", "KERNELS", "attend", "register", "resolve"]
