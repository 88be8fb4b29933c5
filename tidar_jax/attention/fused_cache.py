"""Decode-step cache attention as one fixed-shape fused kernel per layer (GPU; Pallas Triton, interpret mode
elsewhere). Selected by ``DecodeLayout.cache_kernel == "fused"``.

Every one of the step's T query tokens sees its row's whole live cache, so against the cache the step is a
multi-query decode attention with a per-row length: the split-K "flash decoding" shape. The T tokens' R = H/K
query heads of one KV head are folded into one query block of M = T*R rows, so each key block is loaded once per
(row, KV head) and used by all of them. The grid is fixed by shapes alone: ``(rows, KV heads, query blocks,
splits)`` with the splits covering the allocated cache; inside a program the key blocks past the row's live
length are never loaded (the in-kernel loop stops at the live end, so a split wholly past it does no work). No
loop of the surrounding program depends on data, so XLA:GPU never copies a loop predicate to the host (``paged``'s
``while`` over live pages does, every page, every layer).

The kernel returns each split's unnormalised output with its running max and sum; the splits and the step's own
T x T part (a small dense einsum under the layout's local mask) are merged by log-sum-exp outside it.

Why not jax's ``pallas.ops.gpu.decode_attention.gqa`` (the same algorithm, per-row ``kv_seq_len``, residuals):
it takes one layer's cache as ``[N, S, K, D]`` and transposes it to ``[N, K, S, D]`` before its kernel. Fed from
the decoder's whole ``[L, N, C, K, D]`` cache, that is a slice and a transpose of the layer's whole allocated
cache, two copies per layer per step: the cost the live-length kernels exist to avoid. This kernel reads key
blocks of layer ``layer`` straight out of the whole cache (a strided load), the layer index a runtime scalar, so
it also runs inside the training-style ``lax.scan`` over layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MAX_BLOCK_K = 128  # key slots per inner iteration (a Triton tile; a power of two)
MAX_BLOCK_M = 64  # folded query rows per program
TARGET_PROGRAMS = 256  # about two waves on a 132-SM H100: enough splits to fill the GPU at batch 1


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, (max(1, x) - 1).bit_length())


def tiling(n: int, kv: int, m: int, c: int) -> dict:
    """Static tile sizes for ``n`` rows, ``kv`` KV heads, ``m`` folded query rows, a cache of ``c`` slots.

    block_k: key slots per load (<= C so a clamped last block stays in the cache); block_m: query rows per
    program (>= 16, a tensor-core tile); splits: key ranges per (row, KV head, query block), enough programs to
    fill the GPU at batch 1 but no split shorter than one key block."""
    block_k = min(MAX_BLOCK_K, _pow2_floor(c)) if c else 1
    m_pad = max(16, _pow2_ceil(m))
    block_m = min(MAX_BLOCK_M, m_pad)
    q_blocks = m_pad // block_m
    key_blocks = math.ceil(c / block_k) if c else 0
    splits = max(1, min(key_blocks, TARGET_PROGRAMS // max(1, n * kv * q_blocks)))
    split_blocks = math.ceil(key_blocks / splits) if key_blocks else 0
    splits = math.ceil(key_blocks / split_blocks) if split_blocks else 1
    return dict(block_k=block_k, block_m=block_m, m_pad=m_pad, q_blocks=q_blocks, splits=splits,
                split_len=split_blocks * block_k)


def _kernel(layer_ref, length_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_k, split_len, cache_size,
            compute):
    from jax.experimental import pallas as pl

    n, kh, s = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    layer = layer_ref[0]
    length = length_ref[0]
    split_start = s * split_len
    live = jnp.clip(length - split_start, 0, split_len)
    q_MD = q_ref[...]
    io = q_MD.dtype
    block_m = q_MD.shape[0]
    neg = jnp.finfo(compute).min

    def body(j, carry):
        acc_MD, m_M, l_M = carry
        nominal = split_start + j * block_k
        # the last block of the cache is clamped back to end at C: slots below ``nominal`` were counted already
        start = jnp.minimum(nominal, cache_size - block_k)
        k_YD = k_ref[layer, n, pl.ds(start, block_k), kh, :].astype(io)
        v_YD = v_ref[layer, n, pl.ds(start, block_k), kh, :].astype(io)
        slot_Y = start + jnp.arange(block_k)
        ok_Y = (slot_Y >= nominal) & (slot_Y < length)
        s_MY = jnp.dot(q_MD, k_YD.T, preferred_element_type=compute)
        s_MY = jnp.where(ok_Y[None, :], s_MY, -jnp.inf)
        m_new = jnp.maximum(m_M, jnp.max(s_MY, axis=1))
        alpha = jnp.exp(m_M - m_new)
        p_MY = jnp.exp(s_MY - m_new[:, None])
        # a slot past the live length may hold anything (stale or rejected K/V): never multiply it by 0
        v_YD = jnp.where(ok_Y[:, None], v_YD, 0)
        acc_MD = alpha[:, None] * acc_MD + jnp.dot(p_MY.astype(io), v_YD, preferred_element_type=compute)
        return acc_MD, m_new, alpha * l_M + jnp.sum(p_MY, axis=1)

    init = (jnp.zeros(q_MD.shape, compute), jnp.full((block_m,), neg, compute), jnp.zeros((block_m,), compute))
    # the in-kernel loop stops at the live end: blocks past it are never loaded (a split past it does no work)
    acc_MD, m_M, l_M = jax.lax.fori_loop(0, (live + block_k - 1) // block_k, body, init)
    o_ref[...] = acc_MD
    m_ref[...] = m_M
    l_ref[...] = l_M


def split_partials(q_NKMD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N, interpret: bool):
    """Per split: unnormalised output ``[N, K, S, Mp, D]``, running max and sum ``[N, K, S, Mp]`` (compute
    dtype: float32 or wider) of the folded queries ``q [N, K, M, D]`` (already scaled) over layer ``layer``'s cache
    slots ``< length``. Rows past ``M`` are padding."""
    from jax.experimental import pallas as pl

    n, kv, m, d = q_NKMD.shape
    c = cache_k_LNCKD.shape[2]
    t = tiling(n, kv, m, c)
    compute = jnp.promote_types(q_NKMD.dtype, jnp.float32)
    q_NKMD = jnp.pad(q_NKMD, ((0, 0), (0, 0), (0, t["m_pad"] - m), (0, 0)))
    grid = (n, kv, t["q_blocks"], t["splits"])
    bm = t["block_m"]
    kernel = functools.partial(_kernel, block_k=t["block_k"], split_len=t["split_len"], cache_size=c,
                               compute=compute)
    whole = pl.no_block_spec  # the whole cache: key blocks are indexed by layer, row and KV head inside the kernel
    out_shape = [jax.ShapeDtypeStruct((n, kv, t["splits"], t["m_pad"], d), compute),
                 jax.ShapeDtypeStruct((n, kv, t["splits"], t["m_pad"]), compute),
                 jax.ShapeDtypeStruct((n, kv, t["splits"], t["m_pad"]), compute)]
    params = None
    if not interpret:  # Triton (jax 0.10 may default Pallas GPU to Mosaic, which stages whole blocks in shared memory)
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel,
        compiler_params=params,
        grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda i, h, b, s: (0,)),
                  pl.BlockSpec((None, 1), lambda i, h, b, s: (i, 0)),
                  pl.BlockSpec((None, None, bm, d), lambda i, h, b, s: (i, h, b, 0)),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, bm, d), lambda i, h, b, s: (i, h, s, b, 0)),
                   pl.BlockSpec((None, None, None, bm), lambda i, h, b, s: (i, h, s, b)),
                   pl.BlockSpec((None, None, None, bm), lambda i, h, b, s: (i, h, s, b))],
        out_shape=out_shape,
        interpret=interpret,
        name="fused_cache_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), length_N.astype(jnp.int32).reshape(n, 1), q_NKMD, cache_k_LNCKD,
      cache_v_LNCKD)


def cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N, local_mask_NTT,
                     interpret: bool = False):
    """GQA attention of the current queries over layer ``layer``'s cache slots ``< length`` (per row) and the
    current tokens allowed by ``local_mask`` (True = may attend); same contract as ``paged.cached_attention``."""
    n, t, h, d = q_NTHD.shape
    kv = k_NTKD.shape[2]
    r = h // kv
    compute = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    q_NTKRD = q_NTHD.reshape(n, t, kv, r, d).astype(compute) * (d ** -0.5)

    # the step's own tokens: every query sees at least itself, so the merged max is finite
    s_NKRTS = jnp.einsum("ntkrd,nskd->nkrts", q_NTKRD, k_NTKD.astype(compute))
    s_NKRTS = jnp.where(local_mask_NTT[:, None, None], s_NKRTS, -jnp.inf)
    m_NKRT = jnp.max(s_NKRTS, axis=-1)
    p_NKRTS = jnp.exp(s_NKRTS - m_NKRT[..., None])
    l_NKRT = jnp.sum(p_NKRTS, axis=-1)
    acc_NKRTD = jnp.einsum("nkrts,nskd->nkrtd", p_NKRTS, v_NTKD.astype(compute))

    if cache_k_LNCKD.shape[2]:
        q_NKMD = jnp.transpose(q_NTKRD, (0, 2, 3, 1, 4)).reshape(n, kv, r * t, d)
        # the kernel's matmul inputs: the wider of the query and cache dtypes (bf16 on GPU), accumulating in compute
        io = jnp.promote_types(q_NTHD.dtype, cache_k_LNCKD.dtype)
        acc_NKSMD, m_NKSM, l_NKSM = split_partials(q_NKMD.astype(io), cache_k_LNCKD, cache_v_LNCKD, layer,
                                                   length_N, interpret)
        m_NKSRT = m_NKSM[..., :r * t].reshape(n, kv, -1, r, t)
        l_NKSRT = l_NKSM[..., :r * t].reshape(n, kv, -1, r, t)
        acc_NKSRTD = acc_NKSMD[..., :r * t, :].reshape(n, kv, -1, r, t, d)
        m_all = jnp.maximum(m_NKRT, jnp.max(m_NKSRT, axis=2))
        w_NKSRT = jnp.exp(m_NKSRT - m_all[:, :, None])
        w_NKRT = jnp.exp(m_NKRT - m_all)
        l_NKRT = w_NKRT * l_NKRT + jnp.sum(w_NKSRT * l_NKSRT, axis=2)
        acc_NKRTD = w_NKRT[..., None] * acc_NKRTD + jnp.sum(w_NKSRT[..., None] * acc_NKSRTD, axis=2)

    out_NKRTD = acc_NKRTD / l_NKRT[..., None]
    return jnp.transpose(out_NKRTD, (0, 3, 1, 2, 4)).reshape(n, t, h, d).astype(q_NTHD.dtype)


def attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, interpret: bool = False):
    """``cached_attention`` for a ``tidar_jax.masks.DecodeLayout`` with ``cache_kernel == "fused"``."""
    local_1TT = jnp.asarray(layout.local_mask())[None]
    return cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout.cache_len_N,
                            local_1TT, interpret)
