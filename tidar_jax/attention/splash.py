"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) driven by a layout's rule.

The static part of the mask is a splash *computable* mask whose function is the layout's own rule
(``layout.static_rule`` from ``masks.py``): splash evaluates it in numpy on the host to build its
block map (empty blocks are skipped, full blocks need no mask) and in-kernel from index iotas for partial blocks, so
no ``[T, S]`` array exists. The traced part goes through splash's ``SegmentIds`` (``allowed &= seg_q == seg_kv``):

- training / causal layouts: the documents' segment ids (doubled for the ``[clean | mask]`` halves) -- exact;
- decode layouts: the cache-length cut ``k < L`` is the same for every query, so cache slots ``>= L`` get key
  segment 1 and everything else segment 0 -- exact;
- prefill layouts fall back to ``blockwise``: a padding query (prompt index >= L) may see the real prompt *and*
  itself, which no per-token segment id expresses (one id cannot equal both the real keys' and its own), and
  prefill runs once per generation, so the portable kernel costs little there.

Lengths are padded to the block sizes; padded keys are never allowed, and each padded query row is allowed key 0
(with key 0's segment) so splash never sees an all-masked row (whose softmax would be 0/0 and poison gradients);
padded rows are sliced off, so they contribute nothing. The kernel runs per sequence (``vmap`` over the batch);
GQA maps query head ``h`` to kv head ``h // (H / K)``, the grouping of the reference kernel.

On a multi-device mesh (inside ``tidar_jax.sharding.activation_mesh``, as the train step traces) the call is wrapped
in ``jax.shard_map``: XLA cannot partition a Mosaic kernel itself ("Mosaic kernels cannot be automatically
partitioned"). Each device runs the kernel on its rows (batch over data/fsdp) and its heads (over tensor, when the
tensor axis divides both the query and the kv heads, so every local query head finds its kv head locally).

The Pallas TPU module is imported lazily: where it is missing, using this kernel raises one clear line.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.masks import PrefillLayout

BLOCK = 512  # preferred block size (q and kv); clamped to the padded length, always a multiple of 128
LANES = 128  # splash's kv compute block must be a multiple of the TPU lane count


class SplashUnavailable(RuntimeError):
    pass


def _splash_module():
    try:
        splash_attention = importlib.import_module("jax.experimental.pallas.ops.tpu.splash_attention")
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        raise SplashUnavailable(f"model.attention='splash': jax {jax.__version__} has no importable "
                                f"jax.experimental.pallas.ops.tpu.splash_attention ({e}); use blockwise") from None
    return splash_attention


def unavailable_reason(backend: str) -> str | None:
    """Why ``splash`` cannot run compiled on ``backend`` (None when it can)."""
    if backend != "tpu":
        return (f"model.attention='splash' needs a TPU (backend is {backend}); use blockwise or auto "
                "(tests run splash.attend(..., interpret=True) on CPU)")
    try:
        _splash_module()
    except SplashUnavailable as e:
        return str(e)
    return None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(length: int, preferred: int = BLOCK) -> int:
    """The largest of ``preferred, preferred/2, ..., 128`` not above ``length`` rounded up to 128."""
    padded = _round_up(length, LANES)
    b = max(LANES, preferred)
    while b > LANES and b > padded:
        b //= 2
    return b


def _mask_function(layout, q_len: int, k_len: int):
    """``fn(q_ids, kv_ids) -> bool`` of the layout's static rule on padded index grids (numpy or jnp)."""

    def fn(q_ids, kv_ids):
        xp = np if isinstance(q_ids, np.ndarray) and isinstance(kv_ids, np.ndarray) else jnp
        real_q = q_ids < q_len
        allowed = layout.static_rule(q_ids, kv_ids, xp) & real_q & (kv_ids < k_len)
        return allowed | (~real_q & (kv_ids == 0))  # padded query rows: key 0 only (never an empty row)

    return fn


_KERNELS: dict = {}


def _kernel(layout, heads: int, q_pad: int, k_pad: int, q_len: int, k_len: int, block_q: int, block_kv: int,
            interpret: bool):
    """One splash kernel per static rule and shape (building it processes the block maps on the host)."""
    key = (layout.static_key(), heads, q_pad, k_pad, q_len, k_len, block_q, block_kv, interpret)
    if key not in _KERNELS:
        # built eagerly even when called inside a trace: splash makes jnp arrays (its block maps), which a trace
        # would turn into tracers and the cache would then leak into the next trace
        with jax.ensure_compile_time_eval():
            _KERNELS[key] = _build_kernel(key, layout.static_bound(), heads, q_pad, k_pad, q_len, k_len, block_q,
                                          block_kv, interpret)
    return _KERNELS[key]


def _build_kernel(key, layout, heads, q_pad, k_pad, q_len, k_len, block_q, block_kv, interpret):
    sa = _splash_module()

    class LayoutMask(sa.splash_attention_mask._ComputableMask):
        # splash hashes masks (it caches block maps); equal static rules give equal masks
        def __eq__(self, other):
            return type(other) is type(self) and other.key == self.key

        def __hash__(self):
            return hash(self.key)

    one = LayoutMask((q_pad, k_pad), _mask_function(layout, q_len, k_len))
    one.key = key
    sizes = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _segments(layout, n: int, q_len: int, k_len: int):
    """``(seg_q [N, T], seg_kv [N, S])`` int32 carrying the layout's traced data, or None for a static layout."""
    seg = getattr(layout, "segment_ids_NS", None)
    if seg is not None:
        seg_NS = jnp.broadcast_to(jnp.asarray(seg, jnp.int32), (n, seg.shape[-1]))
        reps = q_len // seg_NS.shape[1]  # training: [clean | mask] halves share the documents
        both = jnp.tile(seg_NS, (1, reps))
        return both, both
    cache_len = getattr(layout, "cache_len_N", None)
    if cache_len is not None:
        lens_N1 = jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32).reshape(-1), (n,))[:, None]
        k_idx_S = jnp.arange(k_len)[None, :]
        seg_kv = ((k_idx_S < layout.cache_size) & (k_idx_S >= lens_N1)).astype(jnp.int32)
        return jnp.zeros((n, q_len), jnp.int32), seg_kv
    return None


def attend(q_NTHD, k_NSKD, v_NSKD, layout, *, interpret: bool = False, block: int = BLOCK):
    """Attention of ``q [N, T, H, D]`` over ``k, v [N, S, K, D]`` under ``layout`` with splash (``interpret``:
    the Pallas interpreter, for CPU tests)."""
    if isinstance(layout, PrefillLayout):
        from tidar_jax.attention import blockwise
        return blockwise.attend(q_NTHD, k_NSKD, v_NSKD, layout)
    sa = _splash_module()
    n, t, h, d = q_NTHD.shape
    s = k_NSKD.shape[1]
    if (layout.q_len, layout.k_len) != (t, s):
        raise ValueError(f"layout {type(layout).__name__} is {layout.q_len} queries x {layout.k_len} keys; "
                         f"got q length {t} and k length {s}")
    if h % k_NSKD.shape[2]:
        raise ValueError(f"{h} query heads: must be a multiple of {k_NSKD.shape[2]} kv heads")
    bq, bkv = block_size(t, block), block_size(s, block)
    t_pad, s_pad = _round_up(t, bq), _round_up(s, bkv)

    # splash does not scale the logits; [N, T, H, D] -> [N, H, T_pad, D]
    q = jnp.pad((q_NTHD * jnp.asarray(d ** -0.5, q_NTHD.dtype)).transpose(0, 2, 1, 3),
                ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    k = jnp.pad(k_NSKD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    v = jnp.pad(v_NSKD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))

    segs = _segments(layout, n, t, s)
    if segs is not None:
        seg_q, seg_kv = segs
        seg_kv = jnp.pad(seg_kv, ((0, 0), (0, s_pad - s)), constant_values=-1)
        # padded query rows take key 0's segment (they are allowed key 0 only)
        seg_q = jnp.concatenate([seg_q, jnp.broadcast_to(seg_kv[:, :1], (n, t_pad - t))], axis=1)
        segs = (seg_q, seg_kv)

    args = (q, k, v) + (segs or ())
    mesh = _mesh_to_shard_over()
    specs = _specs(mesh, q.shape, k.shape) if mesh is not None else None
    local_heads = h if specs is None else h // _size(mesh, specs[0][1])
    # built outside the shard_map: the kernel (and its cached block maps) must not belong to a shard_map trace
    kernel = _kernel(layout, local_heads, t_pad, s_pad, t, s, bq, bkv, interpret)

    def run(q, k, v, *segs):
        if not segs:
            return jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
        return jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=sa.SegmentIds(q=sq, kv=skv)))(
            q, k, v, *segs)

    if specs is None:
        out = run(*args)
    else:
        q_spec, kv_spec, row_spec = specs
        out = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(segs or ()),
                            out_specs=q_spec, check_vma=False)(*args)
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _mesh_to_shard_over():
    from tidar_jax.sharding import current_activation_mesh

    mesh = current_activation_mesh()
    return mesh if mesh is not None and mesh.size > 1 else None


def _size(mesh, entry) -> int:
    if entry is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))


def _specs(mesh, q_shape, k_shape):
    """``(q [N, H, T, D], k/v [N, K, S, D], segment rows [N, *])`` specs by the rules table; heads split over the
    tensor axis only when it divides both H and K (else each device would miss kv heads its queries need)."""
    from jax.sharding import PartitionSpec as P

    from tidar_jax.sharding import logical_to_spec

    k_spec = logical_to_spec(("batch", "kv_heads", None, None), k_shape, mesh)
    q_spec = logical_to_spec(("batch", "heads", None, None), q_shape, mesh)
    if k_spec[1] is None or q_spec[1] != k_spec[1]:
        q_spec, k_spec = P(q_spec[0], None, None, None), P(k_spec[0], None, None, None)
    return q_spec, k_spec, P(q_spec[0], None)
