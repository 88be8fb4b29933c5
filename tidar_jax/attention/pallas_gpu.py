"""Block-sparse flash attention as Pallas Triton kernels (NVIDIA GPUs; CPU through the Pallas interpreter).

One fused kernel per direction and layer, FlexAttention-style, driven by the layout's tile schedule
(``schedule.py``, numpy at trace time, the same one ``blockwise`` scans):

- forward: one program per (query tile, batch row, query head); it loops over that query tile's key tiles, first
  the *full* ones (no mask evaluated), then the *partial* ones (the layout's rule evaluated on the tile's indices,
  ``layout.static_rule``, plus the row's traced data as token ids, see ``row_ids``). Empty tiles are never visited.
  Online softmax in fp32; writes the output and the per-row log-sum-exp.
- backward (FlashAttention-2): dK/dV by one program per (key tile, batch row, kv head) over the *transposed*
  schedule (the query tiles that see that key tile), summing the head group of GQA inside the kernel; dQ by one
  program per (query tile, batch row, query head) over the forward schedule. Probabilities are recomputed from the
  saved log-sum-exp, so memory is O(T x tile) per head; ``delta = rowsum(dO * O)`` is one XLA fusion.

The per-query-tile key lists are a small int32 table ``[tiles, 2 + width]`` (counts of full and partial tiles,
then their key tile indices), read by the kernel with scalar loads; loops have data-dependent trip counts inside
the kernel, so no XLA ``while`` loop or per-tile launch exists.

Lengths that are not a multiple of the tile are padded: padded keys are never allowed (``k < k_len`` in partial
tiles; a tile containing padded keys is never full), padded query rows are dropped and get zero output gradient.

Tile sizes per target are in ``TILES`` (the one owner); ``interpret=True`` runs the same kernels in the Pallas
interpreter (CPU tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tidar_jax.attention.schedule import TileSchedule, tile_schedule
from tidar_jax.attention.kernel_names import work_name
from tidar_jax.masks import DecodeLayout, PrefillLayout
from tidar_jax.targets import build_chip


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16 for Triton's dot) and Triton launch parameters for one target."""

    fwd_q: int
    fwd_k: int
    bwd_q: int
    bwd_k: int
    num_warps: int
    num_stages: int


# Per target. Shared memory bounds the tiles: the forward keeps q [tq, D] and num_stages copies of k, v [tk, D]
# (bf16, D=128: 128x128 tiles with 2 stages need ~160 KB, within the H100's 227 KB but not the A100's 163 KB);
# the backward holds k, v, dK, dV for its key tile plus q, dO for one query tile, so it uses 64x64.
# Untuned: the accelerator suite (benchmarks/attention_kernels.py) times them when a GPU is lent.
TILES = {
    "h100": Tiles(128, 128, 64, 64, num_warps=8, num_stages=2),
    "h200": Tiles(128, 128, 64, 64, num_warps=8, num_stages=2),
    "b200": Tiles(128, 128, 64, 64, num_warps=8, num_stages=2),
    "a100": Tiles(128, 64, 64, 64, num_warps=4, num_stages=2),
}
# The interpreter runs each program as a loop on the CPU: small tiles keep the model-level tests quick.
INTERPRET_TILES = Tiles(16, 16, 16, 16, num_warps=4, num_stages=1)
DEFAULT_TARGET = "h100"  # tiles used when the chip is not known (a deviceless compile, an unlisted GPU)


_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("tidar_pallas_gpu_interpret", default=False)


@contextlib.contextmanager
def interpreting():
    """Inside this block ``model.attention=pallas_gpu`` runs the kernels in the Pallas interpreter on any backend
    (how the model-level invariant tests run it on CPU); ``auto`` still never picks it off a GPU."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def unavailable_reason(backend: str) -> str | None:
    """Why ``pallas_gpu`` cannot run compiled on ``backend`` (None when it can, or inside ``interpreting()``)."""
    if backend != "gpu" and not _INTERPRET.get():
        return (f"model.attention='pallas_gpu' needs an NVIDIA GPU (backend is {backend}); use blockwise or auto "
                "(tests run pallas_gpu.attend(..., interpret=True) on CPU)")
    return None


def tiles_for_backend() -> Tiles:
    """The ``TILES`` entry of the chip being built for (``targets.build_chip``: a deviceless target's, or the
    local GPU's), else ``DEFAULT_TARGET``'s."""
    return TILES.get(build_chip(), TILES[DEFAULT_TARGET])


# ----------------------------------------------------------------------------------------------------------------
# What the kernels read: the schedule as per-tile tables, the row's traced data as token ids
# ----------------------------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile_table(sched: TileSchedule, transposed: bool, rows: int) -> np.ndarray:
    """int32 ``[rows, 2 + width]``: per query tile (per key tile when ``transposed``) the number of full and of
    partial partner tiles, then the full partners' indices, then the partial ones' (width a power of two)."""
    row, col = (1, 0) if transposed else (0, 1)
    full, part = sched.full_pairs, sched.partial_pairs
    nf = np.bincount(full[:, row], minlength=rows)[:rows] if len(full) else np.zeros(rows, int)
    npart = np.bincount(part[:, row], minlength=rows)[:rows] if len(part) else np.zeros(rows, int)
    wf = int(nf.max(initial=0))
    width = _next_pow2(2 + wf + int(npart.max(initial=0))) - 2
    table = np.zeros((rows, 2 + width), np.int32)
    table[:, 0], table[:, 1] = nf, npart
    for r in range(rows):
        f = np.sort(full[full[:, row] == r, col])
        p = np.sort(part[part[:, row] == r, col])
        table[r, 2:2 + len(f)] = f
        table[r, 2 + wf:2 + wf + len(p)] = p
    return table, wf


def row_ids(layout, n: int):
    """The layout's traced per-row data as token ids: ``(ids_q [N, T], ids_k [N, S], diagonal)`` int32 with

        layout.block() == layout.static_rule(q, k) & ((ids_q[q] == ids_k[k]) | (diagonal & (q == k)))

    (checked for every layout kind in the tests), or None for a static layout.
    - training / causal: the documents' segment ids (doubled for the ``[clean | mask]`` halves);
    - prefill: key id 1 on padding prompt slots (``L <= k < P``), else 0; a padding query still sees itself
      (the diagonal term), which the rule allows so that no row is empty;
    - decode: key id 1 on cache slots ``>= L``, else 0."""
    if layout.is_static:
        return None
    if isinstance(layout, PrefillLayout):
        lens_N1 = jnp.broadcast_to(jnp.asarray(layout.prompt_len_N, jnp.int32).reshape(-1), (n,))[:, None]
        k_idx = jnp.arange(layout.k_len)[None, :]
        ids_k = ((k_idx < layout.padded_len) & (k_idx >= lens_N1)).astype(jnp.int32)
        return jnp.zeros((n, layout.q_len), jnp.int32), ids_k, True
    if isinstance(layout, DecodeLayout):
        lens_N1 = jnp.broadcast_to(jnp.asarray(layout.cache_len_N, jnp.int32).reshape(-1), (n,))[:, None]
        k_idx = jnp.arange(layout.k_len)[None, :]
        ids_k = ((k_idx < layout.cache_size) & (k_idx >= lens_N1)).astype(jnp.int32)
        return jnp.zeros((n, layout.q_len), jnp.int32), ids_k, False
    seg_NS = jnp.asarray(layout.segment_ids_NS, jnp.int32)
    seg_NS = jnp.broadcast_to(seg_NS, (n, seg_NS.shape[-1]))
    both = jnp.tile(seg_NS, (1, layout.q_len // seg_NS.shape[1]))
    return both, both, False


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: it keys the custom-VJP cache)."""

    rule_key: tuple  # the layout's static_key()
    q_len: int = 0
    k_len: int = 0
    has_ids: bool = False
    diagonal: bool = False
    scale: float = 1.0
    tiles: Tiles | None = None
    interpret: bool = False
    rule: object = dataclasses.field(default=None, compare=False, hash=False)  # the static bound (``static_rule`` runs in-kernel)


_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score: never overflows, exp gives exactly 0


def _allowed(st: _Static, q_idx, k_idx, idq, idk):
    """Boolean ``[tq, tk]``: the layout's rule on one tile (``q_idx [tq]``, ``k_idx [tk]`` absolute indices)."""
    qq, kk = q_idx[:, None], k_idx[None, :]
    allowed = st.rule.static_rule(qq, kk, jnp) & (kk < st.k_len)
    if st.has_ids:
        same = idq[:, None] == idk[None, :]
        if st.diagonal:
            same = same | (qq == kk)
        allowed = allowed & same
    return allowed


def _cd(dtype):
    """Compute dtype: float32 at least (float64 inputs, as in the exactness tests, stay float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _dot(a, b, trans_b=False, trans_a=False):
    if trans_a:
        a = a.T
    if trans_b:
        b = b.T
    return jnp.dot(a, b, preferred_element_type=_cd(a.dtype))


def _visit_lists(table_ref, wf, body, carry):
    """Runs ``body(partner_tile, carry, masked)`` over the full then the partial partners of this program's tile."""
    carry = lax.fori_loop(0, table_ref[0], lambda j, c: body(table_ref[2 + j], c, False), carry)
    return lax.fori_loop(0, table_ref[1], lambda j, c: body(table_ref[2 + wf + j], c, True), carry)


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, *refs, st: _Static, wf: int):
    if st.has_ids:
        idq_ref, idk_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    tq, tk = st.tiles.fwd_q, st.tiles.fwd_k
    qi = pl_program_id(0)
    q = q_ref[...]
    q_idx = qi * tq + jnp.arange(tq)
    idq = idq_ref[...] if st.has_ids else None

    def body(kt, carry, masked):
        acc, m, l = carry
        ks = pl_ds(kt * tk, tk)
        s = _dot(q, k_ref[ks, :], trans_b=True) * st.scale
        if masked:
            allowed = _allowed(st, q_idx, kt * tk + jnp.arange(tk), idq, idk_ref[ks] if st.has_ids else None)
            s = jnp.where(allowed, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        if masked:  # a row with nothing allowed so far has m_new == _NEG: its masked entries must not count as 1
            p = jnp.where(allowed, p, 0.0)
        corr = jnp.exp(m - m_new)
        v = v_ref[ks, :]
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * corr + p.sum(axis=-1)

    d, cd = q.shape[-1], _cd(q.dtype)
    carry = (jnp.zeros((tq, d), cd), jnp.full((tq,), _NEG, cd), jnp.zeros((tq,), cd))
    acc, m, l = _visit_lists(table_ref, wf, body, carry)
    seen = l > 0.0  # padded query rows (and tiles past the schedule) see nothing
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_NEG).astype(lse_ref.dtype)  # exp(s - lse) == 0 when unseen


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static, wf: int):
    if st.has_ids:
        idq_ref, idk_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    tq, tk = st.tiles.bwd_q, st.tiles.bwd_k
    qi = pl_program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_idx = qi * tq + jnp.arange(tq)
    idq = idq_ref[...] if st.has_ids else None

    def body(kt, dq, masked):
        ks = pl_ds(kt * tk, tk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        p = jnp.exp(_dot(q, k, trans_b=True) * st.scale - lse[:, None])
        if masked:
            p = jnp.where(_allowed(st, q_idx, kt * tk + jnp.arange(tk), idq,
                                  idk_ref[ks] if st.has_ids else None), p, 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _visit_lists(table_ref, wf, body, jnp.zeros(q.shape, _cd(q.dtype)))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static, wf: int,
                group: int):
    if st.has_ids:
        idq_ref, idk_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    tq, tk = st.tiles.bwd_q, st.tiles.bwd_k
    ki = pl_program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_idx = ki * tk + jnp.arange(tk)
    idk = idk_ref[...] if st.has_ids else None

    def head(r, carry):
        def body(qt, carry, masked):
            dk, dv = carry
            qs = pl_ds(qt * tq, tq)
            q, do = q_ref[qs, r, :], do_ref[qs, r, :]
            p = jnp.exp(_dot(q, k, trans_b=True) * st.scale - lse_ref[r, qs][:, None])  # [tq, tk]
            if masked:
                p = jnp.where(_allowed(st, qt * tq + jnp.arange(tq), k_idx,
                                      idq_ref[qs] if st.has_ids else None, idk), p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, v, trans_b=True) - delta_ref[r, qs][:, None])
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

        return _visit_lists(table_ref, wf, body, carry)

    zeros = jnp.zeros(k.shape, _cd(k.dtype))
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def pl_program_id(axis):
    from jax.experimental import pallas as pl

    return pl.program_id(axis)


def pl_ds(start, size):
    from jax.experimental import pallas as pl

    return pl.ds(start, size)


# ----------------------------------------------------------------------------------------------------------------
# pallas_calls
# ----------------------------------------------------------------------------------------------------------------

def _name(kernel: str, sched: TileSchedule, q_shape) -> str:
    """The pallas_call's name: ``tidar_flash_<kernel>`` with the sizes its work follows from (the tile pairs its
    schedule visits; ``tidar_jax.analysis.kernel_costs`` counts their FLOPs)."""
    n, _, h, d = q_shape
    return work_name(f"tidar_flash_{kernel}", pairs=sched.visited_pairs, tq=sched.tile_q, tk=sched.tile_k, rows=n,
                     heads=h, dim=d)


def _call(kernel, grid, in_specs, out_specs, out_shape, st: _Static, name: str):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=st.tiles.num_warps,
                                                               num_stages=st.tiles.num_stages),
                          interpret=st.interpret, name=name)


def _table_spec(table):
    from jax.experimental import pallas as pl

    return pl.BlockSpec((None, table.shape[1]), lambda i, n, h: (i, 0))


def _forward(st: _Static, sched: TileSchedule, q, k, v, ids):
    """``(out [N, Tp, H, D], lse [N, H, Tp])`` on padded arrays."""
    from jax.experimental import pallas as pl

    n, tp, h, d = q.shape
    sp, kv = k.shape[1], k.shape[2]
    group = h // kv
    tq = st.tiles.fwd_q
    table, wf = tile_table(sched, False, tp // tq)
    in_specs = [_table_spec(table),
                pl.BlockSpec((None, tq, None, d), lambda i, b, j: (b, i, j, 0)),
                pl.BlockSpec((None, sp, None, d), lambda i, b, j: (b, 0, j // group, 0)),
                pl.BlockSpec((None, sp, None, d), lambda i, b, j: (b, 0, j // group, 0))]
    args = [jnp.asarray(table), q, k, v]
    if st.has_ids:
        in_specs += [pl.BlockSpec((None, tq), lambda i, b, j: (b, i)), pl.BlockSpec((None, sp), lambda i, b, j: (b, 0))]
        args += list(ids)
    out_specs = [pl.BlockSpec((None, tq, None, d), lambda i, b, j: (b, i, j, 0)),
                 pl.BlockSpec((None, None, tq), lambda i, b, j: (b, j, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((n, h, tp), _cd(q.dtype))]
    return _call(functools.partial(_fwd_kernel, st=st, wf=wf), (tp // tq, n, h), in_specs, out_specs, out_shape,
                 st, _name("fwd", sched, q.shape))(*args)


def _backward(st: _Static, sched: TileSchedule, q, k, v, ids, out, lse, do):
    from jax.experimental import pallas as pl

    n, tp, h, d = q.shape
    sp, kv = k.shape[1], k.shape[2]
    group = h // kv
    tq, tk = st.tiles.bwd_q, st.tiles.bwd_k
    cd = _cd(q.dtype)
    delta = jnp.sum(out.astype(cd) * do.astype(cd), axis=-1).transpose(0, 2, 1)  # [N, H, Tp]

    # dQ over the forward schedule
    table, wf = tile_table(sched, False, tp // tq)
    in_specs = [_table_spec(table),
                pl.BlockSpec((None, tq, None, d), lambda i, b, j: (b, i, j, 0)),
                pl.BlockSpec((None, sp, None, d), lambda i, b, j: (b, 0, j // group, 0)),
                pl.BlockSpec((None, sp, None, d), lambda i, b, j: (b, 0, j // group, 0)),
                pl.BlockSpec((None, tq, None, d), lambda i, b, j: (b, i, j, 0)),
                pl.BlockSpec((None, None, tq), lambda i, b, j: (b, j, i)),
                pl.BlockSpec((None, None, tq), lambda i, b, j: (b, j, i))]
    args = [jnp.asarray(table), q, k, v, do, lse, delta]
    if st.has_ids:
        in_specs += [pl.BlockSpec((None, tq), lambda i, b, j: (b, i)), pl.BlockSpec((None, sp), lambda i, b, j: (b, 0))]
        args += list(ids)
    dq = _call(functools.partial(_dq_kernel, st=st, wf=wf), (tp // tq, n, h), in_specs,
               pl.BlockSpec((None, tq, None, d), lambda i, b, j: (b, i, j, 0)),
               jax.ShapeDtypeStruct(q.shape, q.dtype), st, _name("dq", sched, q.shape))(*args)

    # dK, dV over the transposed schedule; the GQA head group is summed in-kernel
    table, wf = tile_table(sched, True, sp // tk)
    q5, do5 = q.reshape(n, tp, kv, group, d), do.reshape(n, tp, kv, group, d)
    lse4, delta4 = lse.reshape(n, kv, group, tp), delta.reshape(n, kv, group, tp)
    in_specs = [_table_spec(table),
                pl.BlockSpec((None, tp, None, group, d), lambda i, b, j: (b, 0, j, 0, 0)),
                pl.BlockSpec((None, tk, None, d), lambda i, b, j: (b, i, j, 0)),
                pl.BlockSpec((None, tk, None, d), lambda i, b, j: (b, i, j, 0)),
                pl.BlockSpec((None, tp, None, group, d), lambda i, b, j: (b, 0, j, 0, 0)),
                pl.BlockSpec((None, None, group, tp), lambda i, b, j: (b, j, 0, 0)),
                pl.BlockSpec((None, None, group, tp), lambda i, b, j: (b, j, 0, 0))]
    args = [jnp.asarray(table), q5, k, v, do5, lse4, delta4]
    if st.has_ids:
        in_specs += [pl.BlockSpec((None, tp), lambda i, b, j: (b, 0)), pl.BlockSpec((None, tk), lambda i, b, j: (b, i))]
        args += list(ids)
    kv_spec = pl.BlockSpec((None, tk, None, d), lambda i, b, j: (b, i, j, 0))
    dk, dv = _call(functools.partial(_dkv_kernel, st=st, wf=wf, group=group), (sp // tk, n, kv), in_specs,
                   [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   st, _name("dkv", sched, q.shape))(*args)
    return dq, dk, dv


_FLASH: dict = {}


def _flash(st: _Static, fwd_sched: TileSchedule, bwd_sched: TileSchedule):
    key = (st, id(fwd_sched), id(bwd_sched))  # schedules are cached per layout and tile in schedule.py
    if key in _FLASH:
        return _FLASH[key]

    @jax.custom_vjp
    def flash(q, k, v, ids):
        return _forward(st, fwd_sched, q, k, v, ids)[0]

    def fwd(q, k, v, ids):
        out, lse = _forward(st, fwd_sched, q, k, v, ids)
        return out, (q, k, v, ids, out, lse)

    def bwd(res, do):
        q, k, v, ids, out, lse = res
        dq, dk, dv = _backward(st, bwd_sched, q, k, v, ids, out, lse, do)
        return dq, dk, dv, jax.tree.map(lambda x: None, ids)

    flash.defvjp(fwd, bwd)
    _FLASH[key] = flash
    return flash


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def attend(q_NTHD, k_NSKD, v_NSKD, layout, *, tiles: Tiles | None = None, interpret: bool | None = None):
    """Attention of ``q [N, T, H, D]`` over ``k, v [N, S, K, D]`` under ``layout`` (a ``tidar_jax.masks`` layout)
    with the Pallas Triton kernels (``interpret``: the Pallas interpreter, for CPU tests; None: inside
    ``interpreting()``; ``tiles``: default the local GPU's ``TILES`` entry, ``INTERPRET_TILES`` when
    interpreting)."""
    interpret = _INTERPRET.get() if interpret is None else interpret
    n, t, h, d = q_NTHD.shape
    s, kv = k_NSKD.shape[1], k_NSKD.shape[2]
    if (layout.q_len, layout.k_len) != (t, s):
        raise ValueError(f"layout {type(layout).__name__} is {layout.q_len} queries x {layout.k_len} keys; "
                         f"got q length {t} and k length {s}")
    if h % kv:
        raise ValueError(f"{h} query heads: must be a multiple of {kv} kv heads")
    tiles = tiles or (INTERPRET_TILES if interpret else tiles_for_backend())
    tq_max, tk_max = max(tiles.fwd_q, tiles.bwd_q), max(tiles.fwd_k, tiles.bwd_k)
    tp, sp = _round_up(t, tq_max), _round_up(s, tk_max)
    fwd_sched = tile_schedule(layout, tiles.fwd_q, tiles.fwd_k)
    bwd_sched = tile_schedule(layout, tiles.bwd_q, tiles.bwd_k)
    ids = row_ids(layout, n)
    diagonal = bool(ids[2]) if ids is not None else False
    if ids is not None:
        ids = (jnp.pad(ids[0], ((0, 0), (0, tp - t))), jnp.pad(ids[1], ((0, 0), (0, sp - s))))
    st = _Static(layout.static_key(), t, s, ids is not None, diagonal, d ** -0.5, tiles, interpret,
                 rule=layout.static_bound())
    q = jnp.pad(q_NTHD, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k = jnp.pad(k_NSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v_NSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    flash = _flash(st, fwd_sched, bwd_sched)
    mesh = _mesh_to_shard_over()
    if mesh is None:
        out = flash(q, k, v, ids)
    else:  # XLA cannot partition a Triton call (it would gather every row to every device): shard it ourselves
        q_spec, kv_spec, row_spec = _specs(mesh, q.shape, k.shape)
        ids_spec = None if ids is None else (row_spec, row_spec)
        out = jax.shard_map(flash, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec,
                            check_vma=False)(q, k, v, ids)
    return out[:, :t]


def _mesh_to_shard_over():
    from tidar_jax.sharding import current_activation_mesh

    mesh = current_activation_mesh()
    return mesh if mesh is not None and mesh.size > 1 else None


def _specs(mesh, q_shape, k_shape):
    """``(q [N, T, H, D], k/v [N, S, K, D], id rows [N, *])`` specs by the rules table: rows over the batch axes;
    heads over the tensor axis only when it splits both H and K alike (each device keeps whole GQA groups)."""
    from jax.sharding import PartitionSpec as P

    from tidar_jax.sharding import logical_to_spec

    q_spec = logical_to_spec(("batch", None, "heads", None), q_shape, mesh)
    k_spec = logical_to_spec(("batch", None, "kv_heads", None), k_shape, mesh)
    if k_spec[2] is None or q_spec[2] != k_spec[2]:
        q_spec, k_spec = P(q_spec[0], None, None, None), P(k_spec[0], None, None, None)
    return q_spec, k_spec, P(q_spec[0], None)
