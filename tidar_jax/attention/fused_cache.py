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

The step's own T x T part (its keys under the layout's static local mask) is folded into split 0 of the same
kernel. The kernel returns each split's unnormalised output with its running max and sum; the splits are merged
by log-sum-exp in the fusion that feeds the output projection.

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
import numpy as np

from tidar_jax.attention.kernel_names import work_name

MAX_BLOCK_K = 128  # key slots per inner iteration (a Triton tile; a power of two)
MAX_BLOCK_M = 64  # folded query rows per program
TARGET_PROGRAMS = 256  # about two waves on a 132-SM H100: enough splits to fill the GPU at batch 1
MAX_SPLITS = 32  # the merge over splits is unrolled into one elementwise fusion (no reduction kernels)


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
    splits = max(1, min(key_blocks, MAX_SPLITS, TARGET_PROGRAMS // max(1, n * kv * q_blocks)))
    split_blocks = math.ceil(key_blocks / splits) if key_blocks else 0
    splits = math.ceil(key_blocks / split_blocks) if split_blocks else 1
    return dict(block_k=block_k, block_m=block_m, m_pad=m_pad, q_blocks=q_blocks, splits=splits,
                split_len=split_blocks * block_k)


def _update(carry, s_MY, v_YD, io):
    """One online-softmax step: fold scores ``s [M, Y]`` (-inf where masked) and values ``v [Y, D]`` in."""
    acc_MD, m_M, l_M = carry
    m_new = jnp.maximum(m_M, jnp.max(s_MY, axis=1))
    alpha = jnp.exp(m_M - m_new)
    p_MY = jnp.exp(s_MY - m_new[:, None])
    acc_MD = alpha[:, None] * acc_MD + jnp.dot(p_MY.astype(io), v_YD, preferred_element_type=acc_MD.dtype)
    return acc_MD, m_new, alpha * l_M + jnp.sum(p_MY, axis=1)


def _kernel(layer_ref, length_ref, q_ref, kc_ref, vc_ref, local_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            block_k, split_len, cache_size, compute, normalize):
    from jax.experimental import pallas as pl

    n, kh, s = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    layer = layer_ref[0]
    length = length_ref[0]
    split_start = s * split_len
    live = jnp.clip(length - split_start, 0, split_len)
    q_MD = q_ref[...]
    io = q_MD.dtype
    block_m = q_MD.shape[0]
    init = (jnp.zeros(q_MD.shape, compute), jnp.full((block_m,), jnp.finfo(compute).min, compute),
            jnp.zeros((block_m,), compute))

    def own_tokens(carry):
        # the step's own K/V under the layout's local mask: split 0 only (every real query sees itself there)
        s_MU = jnp.dot(q_MD, kc_ref[...].astype(io).T, preferred_element_type=compute)
        s_MU = jnp.where(local_ref[...] != 0, s_MU, -jnp.inf)
        return _update(carry, s_MU, vc_ref[...].astype(io), io)

    carry = jax.lax.cond(s == 0, own_tokens, lambda c: c, init)

    def body(j, carry):
        nominal = split_start + j * block_k
        # the last block of the cache is clamped back to end at C: slots below ``nominal`` were counted already
        start = jnp.minimum(nominal, cache_size - block_k)
        k_YD = k_ref[layer, n, pl.ds(start, block_k), kh, :].astype(io)
        v_YD = v_ref[layer, n, pl.ds(start, block_k), kh, :].astype(io)
        slot_Y = start + jnp.arange(block_k)
        ok_Y = (slot_Y >= nominal) & (slot_Y < length)
        s_MY = jnp.where(ok_Y[None, :], jnp.dot(q_MD, k_YD.T, preferred_element_type=compute), -jnp.inf)
        # a slot past the live length may hold anything (stale or rejected K/V): never multiply it by 0
        return _update(carry, s_MY, jnp.where(ok_Y[:, None], v_YD, 0), io)

    # the in-kernel loop stops at the live end: blocks past it are never loaded (a split past it does no work)
    acc_MD, m_M, l_M = jax.lax.fori_loop(0, (live + block_k - 1) // block_k, body, carry)
    # one split: it is the whole result, normalised here (no merge after the kernel; padding rows have l = 0)
    o_ref[...] = jnp.where(l_M[:, None] > 0, acc_MD / l_M[:, None], 0) if normalize else acc_MD
    m_ref[...] = m_M
    l_ref[...] = l_M


def split_partials(q_NKMD, k_NTKD, v_NTKD, local_MT, cache_k_LNCKD, cache_v_LNCKD, layer, length_N,
                   interpret: bool):
    """Per split: unnormalised output ``[N, K, S, Mp, D]`` (normalised when there is one split), running max and
    sum ``[N, K, S, Mp]`` (compute dtype: float32 or wider) of the folded queries ``q [N, K, M, D]`` (already scaled) over layer ``layer``'s cache
    slots ``< length`` and, in split 0, the step's own ``k, v [N, T, K, D]`` where ``local [M, T]`` allows.
    Rows past ``M`` are padding (they see nothing)."""
    from jax.experimental import pallas as pl

    n, kv, m, d = q_NKMD.shape
    t_len = k_NTKD.shape[1]
    c = cache_k_LNCKD.shape[2]
    t = tiling(n, kv, m, c)
    u = max(16, _pow2_ceil(t_len))  # the step's own keys, padded to a tensor-core tile
    compute = jnp.promote_types(q_NKMD.dtype, jnp.float32)
    # queries, the step's keys and its values in one padded array (one fusion feeds the kernel): [Mp | U | U]
    qkv_NKZD = jnp.concatenate([jnp.pad(q_NKMD, ((0, 0), (0, 0), (0, t["m_pad"] - m), (0, 0))),
                                jnp.pad(jnp.swapaxes(k_NTKD, 1, 2), ((0, 0), (0, 0), (0, u - t_len), (0, 0))),
                                jnp.pad(jnp.swapaxes(v_NTKD, 1, 2), ((0, 0), (0, 0), (0, u - t_len), (0, 0)))],
                               axis=2)
    k_block = t["m_pad"] // u  # block index of the keys in units of U (M_pad and U are powers of two, U <= M_pad)
    local_MU = np.zeros((t["m_pad"], u), np.int8)
    local_MU[:m, :t_len] = local_MT
    grid = (n, kv, t["q_blocks"], t["splits"])
    bm = t["block_m"]
    kernel = functools.partial(_kernel, block_k=t["block_k"], split_len=t["split_len"], cache_size=c,
                               compute=compute, normalize=t["splits"] == 1)
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
                  pl.BlockSpec((None, None, u, d), lambda i, h, b, s: (i, h, k_block, 0)),
                  pl.BlockSpec((None, None, u, d), lambda i, h, b, s: (i, h, k_block + 1, 0)),
                  pl.BlockSpec((bm, u), lambda i, h, b, s: (b, 0)),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, bm, d), lambda i, h, b, s: (i, h, s, b, 0)),
                   pl.BlockSpec((None, None, None, bm), lambda i, h, b, s: (i, h, s, b)),
                   pl.BlockSpec((None, None, None, bm), lambda i, h, b, s: (i, h, s, b))],
        out_shape=out_shape,
        interpret=interpret,
        # the sizes its work follows from (tidar_jax.analysis.kernel_costs counts it): every padded query row against
        # the step's U keys and, per live cache slot, the cache (only the live length, a run-time value, decides
        # how many slots it visits)
        name=work_name("fused_cache_attention", rows=n, kvheads=kv, qrows=t["m_pad"], dim=d, keys=u),
    )(jnp.asarray(layer, jnp.int32).reshape(1), length_N.astype(jnp.int32).reshape(n, 1), qkv_NKZD, qkv_NKZD,
      qkv_NKZD, jnp.asarray(local_MU), cache_k_LNCKD, cache_v_LNCKD)


def cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N, local_TT,
                     interpret: bool = False):
    """GQA attention of the current queries over layer ``layer``'s cache slots ``< length`` (per row) and the
    current tokens allowed by the static ``local [T, T]`` mask (True = may attend; the same for every row).
    One kernel does both parts; its splits are merged here by log-sum-exp."""
    n, t, h, d = q_NTHD.shape
    kv = k_NTKD.shape[2]
    r = h // kv
    compute = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    # the kernel's matmul inputs: the wider of the query and cache dtypes (bf16 on GPU), accumulating in compute
    io = jnp.promote_types(q_NTHD.dtype, cache_k_LNCKD.dtype)
    # fold the T tokens' R query heads of each KV head into M = T*R query rows (row m: token m // R)
    q_NKMD = (jnp.transpose(q_NTHD.reshape(n, t, kv, r, d), (0, 2, 1, 3, 4)).reshape(n, kv, t * r, d)
              .astype(compute) * (d ** -0.5)).astype(io)
    local_MT = np.repeat(np.asarray(local_TT, bool), r, axis=0)
    acc_NKSMD, m_NKSM, l_NKSM = split_partials(q_NKMD, k_NTKD.astype(io), v_NTKD.astype(io), local_MT,
                                               cache_k_LNCKD, cache_v_LNCKD, layer, length_N, interpret)
    splits = m_NKSM.shape[2]
    if splits == 1:  # the kernel normalised it: no merge kernel (one fewer per layer)
        out_NKMD = acc_NKSMD[:, :, 0, :t * r]
        return (jnp.transpose(out_NKMD.reshape(n, kv, t, r, d), (0, 2, 1, 3, 4)).reshape(n, t, h, d)
                .astype(q_NTHD.dtype))
    # the merge over the (few, static) splits written elementwise, so XLA emits it as one loop fusion with the
    # output projection's input (a max and a sum reduction would be two more kernels per layer)
    m_NKM = functools.reduce(jnp.maximum, [m_NKSM[:, :, i, :t * r] for i in range(splits)])
    w = [jnp.exp(m_NKSM[:, :, i, :t * r] - m_NKM) for i in range(splits)]
    l_NKM = functools.reduce(jnp.add, [w[i] * l_NKSM[:, :, i, :t * r] for i in range(splits)])
    acc_NKMD = functools.reduce(jnp.add, [w[i][..., None] * acc_NKSMD[:, :, i, :t * r] for i in range(splits)])
    out_NKMD = acc_NKMD / l_NKM[..., None]
    return jnp.transpose(out_NKMD.reshape(n, kv, t, r, d), (0, 2, 1, 3, 4)).reshape(n, t, h, d).astype(q_NTHD.dtype)


def attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, interpret: bool = False):
    """``cached_attention`` for a ``tidar_jax.masks.DecodeLayout`` with ``cache_kernel == "fused"``."""
    return cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout.cache_len_N,
                            layout.local_mask(), interpret)
