"""The lean GPU decode step: rewrites of a forward's arithmetic that XLA:GPU compiles into fewer kernels and less
memory traffic, decided once per forward and passed down to the layers.

Each rewrite computes the same function (exactly, or with the rounding noted at it); each exists because the
compiled H100 decode step (``decode.py --plan --target h100``) had kernels or copies without it. They apply only
where they pay: on GPU (``targets.build_platform()``, so a deviceless ``--target`` compile gets them too), and the
norm rewrites only in a decode step (a cache is read); prefill, training and every CPU or TPU program run the
plain arithmetic.

* ``pad_one_row_gemms`` (GPU): a one-row product ``x @ w`` is computed as two rows. XLA:GPU rewrites a
  vector-matrix product whose weight is small (under 10M elements: the 1.5B model's attention projections) into an
  elementwise multiply that writes a weight-sized product plus a reduction that reads it back, two kernels and
  three times the weight traffic; a two-row product stays one GEMM that reads the weight once.
* ``defer_norms`` (GPU decode step): a layer applies its RMSNorms' per-row factor after the projections,
  ``norm(x) @ w == r * ((x * scale) @ w)``. XLA:GPU emits ``norm(x) @ w`` as three kernels (the residual add with
  the sum of squares, the scaling, the GEMM); this way the scaling fuses into the GEMM's operand and ``r`` into the
  fusion that consumes the GEMM (RoPE, SwiGLU). In bf16 it rounds ``x * scale`` and the product before ``* r``
  instead of ``x * r`` and then ``* scale`` (the products stay in the compute dtype: a float32 GEMM output would
  double the bytes the GEMM writes and the next fusion reads).
* with ``defer_norms``, a one-token step carries a zero padding row (``pad_rows``) through the layers, so every
  projection is a two-row GEMM without a padding kernel of its own; attention skips the row, and it stays zeros;
* with ``defer_norms``, a one-token step normalises q and k per head as one norm over the heads of both
  (``norm_heads_together``): XLA:GPU emits each per-head norm as its own kernel there, and k's with a convert
  before it (three kernels; one this way). With many tokens (a TiDAR step) it is the other way round, so only
  one-token steps use it.
* ``order_cache_write`` (GPU): the decode step's K/V write waits for a value computed from the step's logits
  (``after``). The write updates the donated cache in place, which XLA may only do after every kernel that reads
  the cache; when the write's inputs do not depend on the last layers' attention, XLA:GPU kept the old cache alive
  instead and copied the whole K and V cache twice per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GpuStep(NamedTuple):
    """Which rewrites a forward uses (Python bools: part of the traced program's structure)."""

    pad_one_row_gemms: bool = False
    defer_norms: bool = False

    @property
    def order_cache_write(self) -> bool:
        return self.pad_one_row_gemms


PLAIN = GpuStep()


def for_forward(reads_cache: bool) -> GpuStep:
    """The rewrites of a forward built for the platform being traced for; ``reads_cache``: a decode step."""
    from tidar_jax.targets import build_platform

    gpu = build_platform() == "gpu"
    return GpuStep(pad_one_row_gemms=gpu, defer_norms=gpu and reads_cache)


def pad_rows(step: GpuStep, x_NTE) -> int:
    """Padding rows a forward's layers carry: 1 for a one-token decode step with ``defer_norms``, else 0."""
    return int(step.defer_norms and x_NTE.shape[0] * x_NTE.shape[1] == 1)


def gemm(step: GpuStep, x_RE, w_EF):
    """``x @ w`` for a 2-D ``x``; one row is computed as two with ``pad_one_row_gemms``."""
    if step.pad_one_row_gemms and x_RE.shape[0] == 1:
        return (jnp.pad(x_RE, ((0, 1), (0, 0))) @ w_EF)[:1]
    return x_RE @ w_EF


def norm_heads_together(q_norm, k_norm, q_NTHD, k_NTKD):
    """``q_norm(q), k_norm(k)`` (per-head RMSNorms with the same eps) as one norm over the heads of both; the
    arithmetic per head is ``RMSNorm``'s, so the result is the same."""
    h = q_NTHD.shape[2]
    qk_NTXD = jnp.concatenate([q_NTHD, k_NTKD], axis=2)
    d = qk_NTXD.shape[-1]
    scale_XD = jnp.concatenate([jnp.broadcast_to(q_norm.scale[...], (h, d)),
                                jnp.broadcast_to(k_norm.scale[...], (k_NTKD.shape[2], d))])
    compute = jnp.promote_types(qk_NTXD.dtype, jnp.float32)
    xf = qk_NTXD.astype(compute)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + q_norm.eps)
    out_NTXD = scale_XD.astype(qk_NTXD.dtype) * xf.astype(qk_NTXD.dtype)
    return out_NTXD[:, :, :h], out_NTXD[:, :, h:]


def after(step: GpuStep, value, dependency):
    """``value``, made to wait for ``dependency`` with ``order_cache_write``; unchanged otherwise."""
    if not step.order_cache_write:
        return value
    return jax.lax.optimization_barrier((value, dependency))[0]


__all__ = ["PLAIN", "GpuStep", "after", "for_forward", "gemm", "norm_heads_together", "pad_rows"]
