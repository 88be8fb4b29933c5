"""The FLOPs of the project's custom kernels, counted from the sizes each writes into its ``pallas_call`` name.

XLA cannot see inside a Pallas kernel, so the cost model would charge a block-sparse attention kernel for every
query-key pair of its operands. Each kernel names the sizes its work follows from
(``tidar_jax.attention.kernel_names.work_name``: ``<base>__<size>_<integer>...``, read from the op_name or the
backend_config name of the compiled custom call); this module owns what those sizes cost, per base name:

* ``tidar_flash_{fwd,dq,dkv}`` (``attention.pallas_gpu``): the (query tile, key tile) pairs its schedule visits
  (``pairs``, tiles ``tq`` x ``tk``) for ``rows`` batch rows and ``heads`` query heads of size ``dim``, times the
  matmuls each pair costs (``MATMULS``); masking and softmax are not counted, as the cost model counts no
  elementwise work;
* ``fused_cache_attention`` (``attention.fused_cache``): every padded query row (``qrows``, per ``rows`` x
  ``kvheads``) against the step's ``keys`` padded keys, plus as much again per live cache slot. Only the live
  length, a run-time value, decides how many slots it visits, so that part is charged per slot
  (``per_cache_slot``) for the live length the estimate assumes;
* ``tpu_cache_attention`` (``attention.tpu_cache``): the same work as ``fused_cache_attention``, on TPU.

The sizes are those one launch sees at trace time (inside ``shard_map``: one device's shard), so a call batched
after tracing (``vmap`` of the kernel) would be undercounted; the model's kernels are not.
"""

from __future__ import annotations

import re

# Matmuls per visited tile pair and query head (each 2 x tq x tk x dim FLOPs): the forward QK^T and PV; dQ
# recomputes QK^T, then dO V^T and dS K; dK/dV recomputes QK^T and dO V^T, then P^T dO and dS^T Q.
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _flash(kernel: str):
    return lambda w: (w["pairs"] * w["rows"] * w["heads"] * MATMULS[kernel] * 2 * w["tq"] * w["tk"] * w["dim"], None)


def _fused_cache(w):
    per_slot = 4 * w["rows"] * w["kvheads"] * w["qrows"] * w["dim"]
    return per_slot * w["keys"], per_slot


# base name -> sizes -> (FLOPs of one launch: its fixed part, FLOPs per live cache slot or None)
COSTS = {**{f"tidar_flash_{k}": _flash(k) for k in MATMULS}, "fused_cache_attention": _fused_cache,
         "tpu_cache_attention": _fused_cache}
_NAMED = re.compile(r"(" + "|".join(map(re.escape, sorted(COSTS, key=len, reverse=True))) + r")((?:__[a-z]+_\d+)+)")
_SIZE = re.compile(r"__([a-z]+)_(\d+)")


def named_kernel_flops(text: str) -> tuple[float, float | None] | None:
    """``(fixed FLOPs, FLOPs per live cache slot or None)`` of the first kernel of ``COSTS`` named in ``text`` (an
    op_name, a backend_config), or None when ``text`` names none."""
    m = _NAMED.search(text or "")
    if m is None:
        return None
    fixed, per_slot = COSTS[m.group(1)]({k: int(v) for k, v in _SIZE.findall(m.group(2))})
    return float(fixed), None if per_slot is None else float(per_slot)


__all__ = ["COSTS", "MATMULS", "named_kernel_flops"]
