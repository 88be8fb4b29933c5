"""The FLOPs a custom kernel declares about itself, carried through the compiled HLO in the kernel's name.

XLA cannot see inside a Pallas kernel, so the cost model would charge a block-sparse attention kernel for every
query-key pair of its operands. The kernel knows better (the tiles its schedule visits), and tells the cost model
in the one place that survives compilation on both jax 0.10 and 0.11: its ``pallas_call(name=...)``, which lands in
the custom call's ``op_name`` and its backend_config ``name``. (Pallas's Triton lowering drops ``cost_estimate=``;
``metadata=`` is readable in the backend_config on jax 0.10 but sits inside a compressed proto on 0.11.)

The name is ``<base>__flops_<integer>``: the FLOPs of one launch, computed at trace time from the shapes the call
sees (inside ``shard_map``: one device's shard), so a call batched after tracing (``vmap`` of the kernel) would be
undercounted; the model's kernels are not.
"""

from __future__ import annotations

import re

_FLOPS = re.compile(r"__flops_(\d+)")


def with_flops(name: str, flops: float) -> str:
    """``name`` carrying ``flops`` (the FLOPs of one launch) for ``declared_flops``."""
    return f"{name}__flops_{int(flops)}"


def declared_flops(text: str) -> float | None:
    """The FLOPs declared by the first ``with_flops`` name in ``text`` (an op_name, a backend_config), or None."""
    m = _FLOPS.search(text or "")
    return float(m.group(1)) if m else None


__all__ = ["declared_flops", "with_flops"]
