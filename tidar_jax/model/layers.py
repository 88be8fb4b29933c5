"""Transformer building blocks: RMSNorm, rotary embedding, GQA attention over [cache | current] keys, SwiGLU."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tidar_jax import attention
from tidar_jax.model import gpu_step, tpu_step
from tidar_jax.model.gpu_step import PLAIN, GpuStep


def _dtype(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, init, shape, logical_axes, dtype):
    """An ``nnx.Param`` tagged with logical axis names (mapped to the mesh by ``sharding.LOGICAL_AXIS_RULES``)."""
    value = init(rngs.params(), shape, dtype) if rngs is not None else init(None, shape, dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def _normal(stddev):
    def init(key, shape, dtype):
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 (at least), scaled by a learned weight, as HF Qwen/Llama do."""

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = eps
        self.scale = param(rngs, _ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x):
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(compute)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)

    def deferred(self, x):
        """The norm split for a following projection ``norm(x) @ w == r * ((x * scale) @ w)``: returns
        ``(x * scale, r)`` with ``r = rsqrt(mean(x^2) + eps)`` ``[..., 1]`` in the compute dtype (the lean GPU
        decode step's ``defer_norms``, ``tidar_jax.model.gpu_step``)."""
        compute = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(compute)
        return self.scale[...].astype(x.dtype) * x, jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)


def rope_tables(positions_NT, head_dim: int, theta: float, dtype):
    """cos/sin ``[N, T, D]`` (D = head_dim) for explicit per-token positions (TiDAR repeats position ids)."""
    compute = jnp.promote_types(dtype, jnp.float32)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=compute) / head_dim))
    freqs_NTF = positions_NT.astype(compute)[..., None] * inv_freq
    emb_NTD = jnp.concatenate([freqs_NTF, freqs_NTF], axis=-1)
    return jnp.cos(emb_NTD), jnp.sin(emb_NTD)


def apply_rope(x_NTHD, cos_NTD, sin_NTD):
    """Rotate-half ("NeoX") rotary embedding, the HF Qwen/Llama convention."""
    half = x_NTHD.shape[-1] // 2
    x1, x2 = x_NTHD[..., :half], x_NTHD[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_NTD[:, :, None, :], sin_NTD[:, :, None, :]
    out = x_NTHD.astype(cos.dtype) * cos + rotated.astype(cos.dtype) * sin
    return out.astype(x_NTHD.dtype)


def _project_in(x_NTE, w_EHD, row_scale_NT1=None, step: GpuStep = PLAIN):
    """``einsum("nte,ehd->nthd")`` as a 2-D product over flattened rows and heads (free reshapes), times
    ``row_scale`` (a deferred norm factor, ``RMSNorm.deferred``) when given."""
    e, h, d = w_EHD.shape
    n, t, _ = x_NTE.shape
    y_NTF = gpu_step.gemm(step, x_NTE.reshape(n * t, e), w_EHD.reshape(e, h * d))
    if row_scale_NT1 is not None:
        y_NTF = (y_NTF.reshape(n, t, h * d) * row_scale_NT1).astype(x_NTE.dtype)
    return y_NTF.reshape(n, t, h, d)


def _project_out(x_NTHD, w_HDE, step: GpuStep = PLAIN):
    """``einsum("nthd,hde->nte")`` as a 2-D product (see ``_project_in``)."""
    h, d, e = w_HDE.shape
    n, t = x_NTHD.shape[:2]
    return gpu_step.gemm(step, x_NTHD.reshape(n * t, h * d), w_HDE.reshape(h * d, e)).reshape(n, t, e)


class LayerCache(NamedTuple):
    """The whole KV cache ``[L, N, C, K, D]`` and the index of the layer being computed. Passed whole (not sliced
    per layer by the layer scan) so that decode attention can read pages of it in place."""

    k_LNCKD: jax.Array
    v_LNCKD: jax.Array
    layer: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = _dtype(cfg.param_dtype)
        self.cfg = cfg
        init = _normal(0.02)
        self.q_proj = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, _zeros, (h, hd), ("heads", "head_dim"), pd)
            self.k_bias = param(rngs, _zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, _zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs, axis_name="head_dim")

    def __call__(self, x_NTE, cos_NTD, sin_NTD, mask_NTS, cache: "LayerCache | None" = None, row_scale_NT1=None,
                 step: GpuStep = PLAIN):
        """Returns (out_NTE, k_NTKD, v_NTKD); the current K/V (after RoPE) are returned, never cached here.
        ``row_scale``: a deferred norm factor (``RMSNorm.deferred``) the projections of ``x`` are multiplied by;
        ``step``: the forward's GPU rewrites (``tidar_jax.model.gpu_step``).

        ``mask_NTS``: a ``tidar_jax.masks`` layout (attended with the ``cfg.attention`` kernel) or a dense boolean
        mask over keys ``[cache | current]`` (attended with the reference kernel); with a cache, see
        ``tidar_jax.attention.attend_with_cache``."""
        dt = x_NTE.dtype
        tpu = tpu_step.active(cache)

        def project_in(w_EHD):
            if tpu:
                return tpu_step.project_in(x_NTE, w_EHD, row_scale_NT1)
            return _project_in(x_NTE, w_EHD, row_scale_NT1, step)

        # named so the "qkvo" remat policy can keep them (tidar_jax.model.remat)
        q = checkpoint_name(project_in(self.q_proj[...].astype(dt)), "q_proj")
        k = checkpoint_name(project_in(self.k_proj[...].astype(dt)), "k_proj")
        v = checkpoint_name(project_in(self.v_proj[...].astype(dt)), "v_proj")
        if self.cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        t = cos_NTD.shape[1]
        if x_NTE.shape[1] > t:  # padding rows (``gpu_step.pad_rows``): only the first ``t`` are tokens
            q, k, v = q[:, :t], k[:, :t], v[:, :t]
        if self.cfg.qk_norm and step.defer_norms and t == 1:
            q, k = gpu_step.norm_heads_together(self.q_norm, self.k_norm, q, k)
        elif self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_NTD, sin_NTD), apply_rope(k, cos_NTD, sin_NTD)
        if cache is None:
            attn_NTHD = attention.attend(q, k, v, mask_NTS, self.cfg.attention)
        else:
            attn_NTHD = attention.attend_with_cache(q, k, v, cache.k_LNCKD, cache.v_LNCKD, cache.layer, mask_NTS,
                                                    self.cfg.attention)
        if x_NTE.shape[1] > t:
            attn_NTHD = jnp.pad(attn_NTHD, ((0, 0), (0, x_NTE.shape[1] - t), (0, 0), (0, 0)))
        w_HDE = self.o_proj[...].astype(dt)
        out = tpu_step.project_out(attn_NTHD, w_HDE) if tpu else _project_out(attn_NTHD, w_HDE, step)
        out = checkpoint_name(out, "o_proj")
        return out, k, v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.mlp_size
        pd = _dtype(cfg.param_dtype)
        init = _normal(0.02)
        self.gate_proj = param(rngs, init, (d, f), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, init, (d, f), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, init, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x_NTE, row_scale_NT1=None):
        """``row_scale``: a deferred norm factor (``RMSNorm.deferred``) the gate and up products are multiplied by."""
        dt = x_NTE.dtype
        gate = x_NTE @ self.gate_proj[...].astype(dt)
        up = x_NTE @ self.up_proj[...].astype(dt)
        if row_scale_NT1 is not None:
            gate, up = (gate * row_scale_NT1).astype(dt), (up * row_scale_NT1).astype(dt)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)
