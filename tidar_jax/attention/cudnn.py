"""GPU attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` with the layout as a bias.

cuDNN's fused attention knows causal / padding / sliding-window masks only, so TiDAR's mask goes in as a dense
additive bias ``[N, 1, T, S]`` (0 where allowed, a large negative where not), broadcast over heads and, for a
static layout, over the batch. The compute is dense (no tile skipping: about 4x the ideal FLOPs on the training
layout), but fused, so no ``[T, S]`` fp32 scores are written per head; only the one bias per sequence (or one in
all for static layouts) exists. The API does GQA itself (query heads a multiple of kv heads). cuDNN needs
fp16/bf16 inputs and, when training with a bias, even T and S (both hold for the TiDAR layouts).

``implementation="xla"`` runs the same bias through XLA on any backend; the tests use it on CPU to check the bias
construction against the reference kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unavailable_reason(backend: str) -> str | None:
    """Why ``cudnn`` cannot run on ``backend`` (None when it can)."""
    if backend != "gpu":
        return f"model.attention='cudnn' needs an NVIDIA GPU with cuDNN (backend is {backend}); use blockwise or auto"
    return None


def layout_bias(layout, dtype):
    """Additive bias ``[N, 1, T, S]`` (leading axis 1 for a static layout, else per row): 0 allowed, very negative not.

    -0.7 x the dtype's max, not -inf, so a score plus the bias never overflows and a masked entry's exp is 0."""
    allowed_NTS = jnp.asarray(layout.block())
    neg = jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)
    return jnp.where(allowed_NTS, jnp.zeros((), dtype), neg)[:, None]


def attend(q_NTHD, k_NSKD, v_NSKD, layout, *, implementation: str = "cudnn"):
    """Attention of ``q [N, T, H, D]`` over ``k, v [N, S, K, D]`` under ``layout`` (``implementation``:
    ``cudnn`` on GPU, ``xla`` anywhere)."""
    t, s = q_NTHD.shape[1], k_NSKD.shape[1]
    if (layout.q_len, layout.k_len) != (t, s):
        raise ValueError(f"layout {type(layout).__name__} is {layout.q_len} queries x {layout.k_len} keys; "
                         f"got q length {t} and k length {s}")
    bias = layout_bias(layout, q_NTHD.dtype)
    if bias.shape[0] not in (1, q_NTHD.shape[0]):
        bias = jnp.broadcast_to(bias, (q_NTHD.shape[0],) + bias.shape[1:])
    return jax.nn.dot_product_attention(q_NTHD, k_NSKD, v_NSKD, bias=bias, implementation=implementation)
