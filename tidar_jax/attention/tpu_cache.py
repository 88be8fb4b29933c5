"""Decode-step cache attention as one fixed-shape Pallas TPU (Mosaic) kernel per layer; Pallas interpret mode
elsewhere. The TPU counterpart of ``tidar_jax.attention.fused_cache``: the same ``attend`` entry point and contract.

Every one of the step's T query tokens sees its row's whole live cache, so against the cache the step is a
multi-query decode attention with a per-row length. The T tokens' R = H/K query heads of one KV head are folded
into M = T*R query rows, so each cache block is read once per (row, KV head) and used by all of them.

Grid ``(rows N, cache blocks C/block_k)``: rows parallel, blocks the reduction (online softmax in VMEM scratch).
A grid step holds every KV head of its cache block (``[block_k, K, D]``): Mosaic blocks keep the minor two
dimensions whole, and the decoder's cache has K second-minor. Scalar prefetch: the layer index and the per-row
live lengths (SMEM). The cache block's index map reads both: it addresses layer ``layer`` of the whole
``[L, N, C, K, D]`` cache in place (the pipeline DMAs blocks straight out of HBM; the cache operands are pinned
to HBM, so XLA does not copy a cache that fits into VMEM first) and clamps the block index to the row's last live
block. A clamped step asks for the block it already holds, so the pipeline issues no DMA for it, and ``pl.when``
skips its compute: the work follows each row's live length while the program's shape depends on shapes alone (no
``while`` in the compiled step, unlike ``paged``).

The step's own T x T part initialises the softmax state at block 0, so no log-sum-exp merge runs after the
kernel. Its mask is the layout's own rule (``DecodeLayout.static_rule``: the TiDAR decode mask with any pruned
groups) evaluated in the kernel on index vectors; a stored ``[M, U]`` table would be read every layer. Mosaic
lowers integer ``//`` through the chip's description, so a deviceless lowering needs the target's mesh set
(``jax.set_mesh``, or the ``shard_map`` a multi-chip mesh needs anyway).

Why not jax's ``pallas.ops.tpu.paged_attention`` or ``ragged_paged_attention``: see docs/attention.md
(in short: neither returns the softmax statistics a merge with the T x T part needs, neither can express the
TiDAR mask, and both want a cache layout other than the decoder's, so feeding them copies the cache every step).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.attention.kernel_names import work_name

# Cache slots per grid step. A grid step costs a fixed overhead (about 0.35 us, the Pallas TPU guide says) besides
# its DMA, so the block is large; a row shorter than a block still reads one block. A multiple of 128 (the lane
# width: the scores' minor dim).
MAX_BLOCK_K = 512
LANES = 128  # the softmax running max and sum are kept lane-replicated, as Mosaic's own attention kernels do
SUBLANES = 16  # row padding of the folded queries and the step's own keys (bf16 packs 16 rows per vreg tile)
# Scoped VMEM the kernel may claim. Mosaic's default (16 MiB) is too small for a B=16 step of a 7B model (28 query
# and 4 KV heads: 1904 folded rows per KV head); 48 MiB leaves room inside the smallest VMEM of the chips we
# target (64 MiB per core on v5p; 128 MiB on v5e and v6e).
MAX_VMEM_BYTES = 48 * 2 ** 20
DEFAULT_VMEM_BYTES = 16 * 2 ** 20


def _round_up(x: int, m: int) -> int:
    return -(-max(1, x) // m) * m


def tiling(c: int) -> dict:
    """Static tile sizes for a cache of ``c`` slots: ``block_k`` (a multiple of 128, or the whole cache when it
    is shorter than that) and the number of cache blocks (the last may be partial; slots past C are masked)."""
    block_k = c if c <= LANES else min(MAX_BLOCK_K, c // LANES * LANES)
    return dict(block_k=max(1, block_k), blocks=max(1, math.ceil(c / max(1, block_k))))


def _kernel(layer_ref, length_ref, q_ref, k_own_ref, v_own_ref, kc_ref, vc_ref, o_ref, m_scr, l_scr, acc_scr, *,
            block_k, compute, mask_value, local, t_len, r):
    from jax.experimental import pallas as pl

    del layer_ref  # used by the index maps only
    n, j = pl.program_id(0), pl.program_id(1)
    length = length_ref[n]
    kv = q_ref.shape[0]
    io = q_ref.dtype
    dims = (((1,), (1,)), ((), ()))  # q @ k.T without a transpose in the kernel

    def update(h, s_MY, v_YD):
        m_prev, l_prev = m_scr[h], l_scr[h]
        m_next = jnp.maximum(m_prev, jnp.max(s_MY, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p_MY = jnp.exp(s_MY - m_next[:, :1])
        l_scr[h] = alpha * l_prev + jnp.sum(p_MY, axis=1, keepdims=True)
        m_scr[h] = m_next
        acc_scr[h] = alpha[:, :1] * acc_scr[h] + jnp.dot(p_MY.astype(io), v_YD, preferred_element_type=compute)

    @pl.when(j == 0)
    def own_tokens():
        # the step's own keys under the static local mask: every real query row sees itself, so its running max
        # is a real score from here on; padding rows see nothing and stay finite (mask_value, never -inf)
        m_scr[...] = jnp.full(m_scr.shape, mask_value, compute)
        l_scr[...] = jnp.zeros(l_scr.shape, compute)
        acc_scr[...] = jnp.zeros(acc_scr.shape, compute)
        # the local mask from its rule on index vectors (a stored [M, U] table would be read every layer)
        row_M1 = jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[1], 1), 0)
        key_1U = jax.lax.broadcasted_iota(jnp.int32, (1, k_own_ref.shape[1]), 1)
        token_M1 = jax.lax.div(row_M1, jnp.int32(r))
        allowed_MU = local(token_M1, key_1U) & (row_M1 < t_len * r) & (key_1U < t_len)
        for h in range(kv):
            s_MU = jax.lax.dot_general(q_ref[h], k_own_ref[h], dims, preferred_element_type=compute)
            update(h, jnp.where(allowed_MU, s_MU, mask_value), v_own_ref[h])

    @pl.when(j * block_k < length)
    def cache_block():
        # a slot past the live length (or past C in a partial last block) may hold anything, NaN included:
        # select it away in the scores and in the values, never multiply it by 0
        ok_1Y = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < length
        ok_Y1 = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length
        for h in range(kv):  # the block holds every KV head (Mosaic blocks keep the minor two dims whole)
            s_MY = jax.lax.dot_general(q_ref[h], kc_ref[:, h, :].astype(io), dims, preferred_element_type=compute)
            update(h, jnp.where(ok_1Y, s_MY, mask_value), jnp.where(ok_Y1, vc_ref[:, h, :].astype(io), 0))

    @pl.when(j == pl.num_programs(1) - 1)
    def finish():
        o_ref[...] = (acc_scr[...] / l_scr[...][:, :, :1]).astype(o_ref.dtype)


def folded_attention(q_NKMD, k_NKUD, v_NKUD, local, t_len: int, r: int, cache_k_LNCKD, cache_v_LNCKD, layer,
                     length_N, interpret: bool):
    """Normalised attention ``[N, K, M, D]`` (in the queries' dtype) of the folded, scaled queries ``q [N, K, M, D]``
    (row m < T*R is token m // R) over layer ``layer``'s cache slots ``< length`` and the step's own
    ``k, v [N, K, U, D]`` where ``local(q_token, k_token)`` allows. ``M`` and ``U`` are padded past ``T*R`` and
    ``T``; padding query rows come out finite and meaningless."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    n, kv, m, d = q_NKMD.shape
    u = k_NKUD.shape[2]
    c = cache_k_LNCKD.shape[2]
    t = tiling(c)
    block_k, blocks = t["block_k"], t["blocks"]
    compute = jnp.promote_types(q_NKMD.dtype, jnp.float32)
    mask_value = float(jnp.finfo(compute).min)

    def cache_block(i, j, layer_ref, length_ref):
        # a block past the row's live end asks for the last live one again: the pipeline skips the repeated DMA
        # (lax.div: truncating, exact for the non-negative operand; Mosaic lowers ``//`` through the chip's info)
        last = jax.lax.div(jnp.maximum(length_ref[i] - 1, 0), jnp.int32(block_k))
        return layer_ref[0], i, jnp.minimum(j, last), 0, 0

    # the cache stays where it lives: left alone, XLA's memory-space assignment may copy a cache that fits into
    # VMEM before the kernel (the whole allocated cache, every step), which the live-length DMAs exist to avoid
    # (a hint to XLA:TPU only: Pallas' interpreter inside a shard_map cannot slice an HBM-annotated operand)
    in_hbm = (lambda x: x) if interpret else functools.partial(pltpu.with_memory_space_constraint,
                                                               memory_space=pltpu.HBM)
    per_row = lambda i, j, *_: (i, 0, 0, 0)  # noqa: E731
    vmem = _vmem_bytes(kv, m, u, d, block_k, q_NKMD.dtype, cache_k_LNCKD.dtype, compute)
    kernel = functools.partial(_kernel, block_k=block_k, compute=compute, mask_value=mask_value, local=local,
                               t_len=t_len, r=r)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n, blocks),
        in_specs=[pl.BlockSpec((None, kv, m, d), per_row),
                  pl.BlockSpec((None, kv, u, d), per_row),
                  pl.BlockSpec((None, kv, u, d), per_row),
                  pl.BlockSpec((None, None, block_k, kv, d), cache_block),
                  pl.BlockSpec((None, None, block_k, kv, d), cache_block)],
        out_specs=pl.BlockSpec((None, kv, m, d), per_row),
        scratch_shapes=[pltpu.VMEM((kv, m, LANES), compute), pltpu.VMEM((kv, m, LANES), compute),
                        pltpu.VMEM((kv, m, d), compute)])
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((n, kv, m, d), q_NKMD.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=min(MAX_VMEM_BYTES, max(DEFAULT_VMEM_BYTES, vmem))),
        interpret=interpret,
        # the sizes its work follows from (tidar_jax.analysis.kernel_costs counts it): every padded query row against
        # the step's U keys and, per live cache slot, the cache (only the live length, a run-time value, decides
        # how many slots it visits)
        name=work_name("tpu_cache_attention", rows=n, kvheads=kv, qrows=m, dim=d, keys=u),
    )(jnp.asarray(layer, jnp.int32).reshape(1), length_N.astype(jnp.int32).reshape(n), q_NKMD, k_NKUD, v_NKUD,
      in_hbm(cache_k_LNCKD), in_hbm(cache_v_LNCKD))


def _vmem_bytes(kv, m, u, d, block_k, io, cache_dtype, compute) -> int:
    """What one grid step holds in VMEM, with a quarter spare: the double-buffered blocks (cache K and V with
    their KV-head dim padded to a sublane tile, queries, the step's own K and V, the output) and the scratch."""
    tile_rows = lambda dt: 32 // jnp.dtype(dt).itemsize  # noqa: E731  (8 rows of 32 bits, 16 of bf16)
    cache = 2 * 2 * block_k * _round_up(kv, tile_rows(cache_dtype)) * d * jnp.dtype(cache_dtype).itemsize
    blocks = 2 * kv * (2 * m + 2 * u) * d * jnp.dtype(io).itemsize
    scratch = kv * m * (2 * LANES + d) * jnp.dtype(compute).itemsize
    return (cache + blocks + scratch) * 5 // 4


def cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N, local,
                     interpret: bool = False):
    """GQA attention of the current queries over layer ``layer``'s cache slots ``< length`` (per row) and the
    current tokens that ``local(q_token, k_token) -> bool`` allows (elementwise on int32 index arrays, with jnp
    ops only: it runs inside the kernel; the same for every row). ``fused_cache.cached_attention``'s contract,
    with the local mask as a rule instead of a stored table."""
    n, t, h, d = q_NTHD.shape
    kv = k_NTKD.shape[2]
    r = h // kv
    compute = jnp.promote_types(q_NTHD.dtype, jnp.float32)
    # matmul inputs: the wider of the query and cache dtypes (bf16 on TPU), accumulating in compute
    io = jnp.promote_types(q_NTHD.dtype, cache_k_LNCKD.dtype)
    m_pad, u = _round_up(t * r, SUBLANES), _round_up(t, SUBLANES)
    # fold the T tokens' R query heads of each KV head into M = T*R query rows (row m: token m // R)
    q_NKMD = (jnp.transpose(q_NTHD.reshape(n, t, kv, r, d), (0, 2, 1, 3, 4)).reshape(n, kv, t * r, d)
              .astype(compute) * (d ** -0.5)).astype(io)
    q_NKMD = jnp.pad(q_NKMD, ((0, 0), (0, 0), (0, m_pad - t * r), (0, 0)))

    def own(x_NTKD):  # the step's own keys or values as [N, K, U, D]
        return jnp.pad(jnp.swapaxes(x_NTKD.astype(io), 1, 2), ((0, 0), (0, 0), (0, u - t), (0, 0)))

    out_NKMD = folded_attention(q_NKMD, own(k_NTKD), own(v_NTKD), local, t, r, cache_k_LNCKD, cache_v_LNCKD, layer,
                                length_N, interpret)[:, :, :t * r]
    return jnp.transpose(out_NKMD.reshape(n, kv, t, r, d), (0, 2, 1, 3, 4)).reshape(n, t, h, d).astype(q_NTHD.dtype)


def local_rule(layout):
    """``local(q_token, k_token)`` of a ``tidar_jax.masks.DecodeLayout``: its own rule among the step's tokens
    (the decode mask's owner), evaluated in the kernel."""
    return lambda q_tok, k_tok: layout.static_rule(q_tok, layout.cache_size + k_tok, jnp)


def attend(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout, interpret: bool = False):
    """``cached_attention`` for a ``tidar_jax.masks.DecodeLayout`` (its per-row lengths and local rule); on a
    multi-device mesh (``tidar_jax.sharding.activation_mesh``) inside a ``shard_map``: XLA cannot partition a
    Mosaic kernel ("Mosaic kernels cannot be automatically partitioned")."""
    from tidar_jax.sharding import current_activation_mesh

    local = local_rule(layout)
    mesh = current_activation_mesh()
    if mesh is None or mesh.size == 1:
        return cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, layout.cache_len_N,
                                local, interpret)
    return _sharded(mesh, local, interpret, q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer,
                    layout.cache_len_N)


def shard_plan(mesh, n: int, h: int, kv: int) -> dict:
    """How the kernel splits over ``mesh``: ``rows`` (the mesh axes of the batch, by the rules table) and
    ``heads``: "kv" (the tensor axis divides the KV heads: each device its query heads and their KV heads, as the
    cache is sharded), "within_kv" (it divides the query heads but not the KV heads, and each device's query heads
    belong to one KV head: the cache and the step's K/V stay replicated over it, as the rules table leaves them)
    or "replicated" (every device all heads)."""
    from tidar_jax.sharding import logical_to_spec

    rows = logical_to_spec(("batch",), (n,), mesh)[0]
    tp = mesh.shape.get("tensor", 1)
    if tp == 1 or h % tp:
        heads = "replicated"
    elif kv % tp == 0:
        heads = "kv"
    else:
        heads = "within_kv" if (h // kv) % (h // tp) == 0 else "replicated"
    return dict(rows=rows, heads=heads)


def _sharded(mesh, local, interpret, q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer, length_N):
    """The kernel per device of ``mesh`` (``shard_plan``): rows over the batch axes, heads over the tensor axis.
    "within_kv": a device's query heads sit in their KV head's slot of a ``[K, H/tp]`` head grid (zeros in the
    other KV heads' slots) so the kernel's KV-head grouping holds; the extra rows cost matmul work, no cache
    traffic (a kernel block holds every KV head anyway)."""
    from jax.sharding import PartitionSpec as P

    n, _, h, _ = q_NTHD.shape
    kv = k_NTKD.shape[2]
    plan = shard_plan(mesh, n, h, kv)
    rows = plan["rows"]
    head_axis = None if plan["heads"] == "replicated" else "tensor"
    kv_axis = "tensor" if plan["heads"] == "kv" else None
    q_spec = P(rows, None, head_axis, None)
    kv_spec = P(rows, None, kv_axis, None)
    cache_spec = P(None, rows, None, kv_axis, None)

    def run(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer_1, length_N):
        if plan["heads"] != "within_kv":
            return cached_attention(q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, layer_1[0], length_N,
                                    local, interpret)
        nl, t, hl, d = q_NTHD.shape
        kv_index = jax.lax.axis_index("tensor") * hl // (h // kv)
        grid_NTKRD = jnp.zeros((nl, t, kv, hl, d), q_NTHD.dtype)
        grid_NTKRD = jax.lax.dynamic_update_index_in_dim(grid_NTKRD, q_NTHD[:, :, None], kv_index, 2)
        out_NTKRD = cached_attention(grid_NTKRD.reshape(nl, t, kv * hl, d), k_NTKD, v_NTKD, cache_k_LNCKD,
                                     cache_v_LNCKD, layer_1[0], length_N, local,
                                     interpret).reshape(nl, t, kv, hl, d)
        return jax.lax.dynamic_index_in_dim(out_NTKRD, kv_index, 2, keepdims=False)

    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, cache_spec, cache_spec, P(), P(rows)),
                         out_specs=q_spec, check_vma=False)(
        q_NTHD, k_NTKD, v_NTKD, cache_k_LNCKD, cache_v_LNCKD, jnp.asarray(layer, jnp.int32).reshape(1), length_N)
