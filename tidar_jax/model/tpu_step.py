"""Rewrites of the decode step for XLA:TPU, each judged on the compiled program of a deviceless v5e compile
(``decode.py --plan --target v5e-4``, ``tidar_jax.analysis.decode_plan``). The one place they live: the model
and the decode engine ask ``active(cache)`` and call these instead of their generic forms. Prefill, training
and every CPU or GPU program are unchanged.

* ``project_in`` / ``project_out``: the attention projections as 3-D contractions. The generic 2-D form
  (``x @ w.reshape(E, H*D)``, which XLA:GPU needs: see ``model.layers._project_in``) makes XLA:TPU copy the query
  weight ``[E, H, D]`` into a ``[E, H*D]`` layout every step (its tiled layout pads H = 12 to 16, so the reshape
  is no bitcast: 4.7 MB read and written per layer at 1.5B); the 3-D ``dot_general`` reads the weight in place.
* ``cache_write_after_reads``: the K/V write is ordered after every layer's cache read (``decode.kv.after``), as
  on GPU: otherwise XLA:TPU keeps the old cache alive for the write and copies the whole K and V cache (twice
  each in the TiDAR B=16 step).
"""

from __future__ import annotations

import jax.numpy as jnp


def active(cache) -> bool:
    """Whether a forward is a decode step (it reads a cache) being built for a TPU."""
    from tidar_jax.targets import build_platform

    return cache is not None and build_platform() == "tpu"


def project_in(x_NTE, w_EHD, row_scale_NT1=None):
    """``x @ w`` ``[N, T, H, D]``, times ``row_scale`` (a deferred norm factor) when given."""
    y_NTHD = jnp.einsum("nte,ehd->nthd", x_NTE, w_EHD)
    if row_scale_NT1 is not None:
        y_NTHD = (y_NTHD * row_scale_NT1[..., None]).astype(x_NTE.dtype)
    return y_NTHD


def project_out(x_NTHD, w_HDE):
    return jnp.einsum("nthd,hde->nte", x_NTHD, w_HDE)


def cache_write_after_reads() -> bool:
    from tidar_jax.targets import build_platform

    return build_platform() == "tpu"

