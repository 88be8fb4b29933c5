"""The FLOPs a custom kernel declares about itself, carried through the compiled HLO in the kernel's name.

XLA cannot see inside a Pallas kernel, so the cost model would charge a block-sparse attention kernel for every
query-key pair of its operands. The kernel knows better (the tiles its schedule visits), and tells the cost model
in the one place that survives compilation on both jax 0.10 and 0.11: its ``pallas_call(name=...)``, which lands in
the custom call's ``op_name`` and its backend_config ``name``. (Pallas's Triton lowering drops ``cost_estimate=``;
``metadata=`` is readable in the backend_config on jax 0.10 but sits inside a compressed proto on 0.11.)

The name is ``<base>__flops_<integer>``: the FLOPs of one launch, computed at trace time from the shapes the call
sees (inside ``shard_map``: one device's shard), so a call batched after tracing (``vmap`` of the kernel) would be
undercounted; the model's kernels are not. A kernel whose work grows with a length known only at run time (the
fused cache attention: the live cache slots) adds ``__per_cache_slot_<integer>``: its FLOPs are then the fixed part
plus that many per live slot, the live length being an assumption of the estimate (all allocated slots if none).
"""

from __future__ import annotations

import re

_FLOPS = re.compile(r"__flops_(\d+)")
_PER_SLOT = re.compile(r"__per_cache_slot_(\d+)")


def with_flops(name: str, flops: float, per_cache_slot: float | None = None) -> str:
    """``name`` carrying ``flops`` (the FLOPs of one launch; with ``per_cache_slot``, its fixed part) for
    ``declared_flops`` and ``declared_per_cache_slot``."""
    tail = f"__per_cache_slot_{int(per_cache_slot)}" if per_cache_slot is not None else ""
    return f"{name}__flops_{int(flops)}{tail}"


def declared_flops(text: str) -> float | None:
    """The FLOPs declared by the first ``with_flops`` name in ``text`` (an op_name, a backend_config), or None."""
    m = _FLOPS.search(text or "")
    return float(m.group(1)) if m else None


def declared_per_cache_slot(text: str) -> float | None:
    """The FLOPs per live cache slot declared by a ``with_flops`` name in ``text``, or None."""
    m = _PER_SLOT.search(text or "")
    return float(m.group(1)) if m else None


__all__ = ["declared_flops", "declared_per_cache_slot", "with_flops"]
