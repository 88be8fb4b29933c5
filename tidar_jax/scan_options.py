"""Whether ``lax.scan`` loops (layers, loss chunks) are unrolled while tracing.

Training always scans (compile time independent of depth). XLA's cost analysis counts a while-loop body once,
so ``train.py --plan`` lowers a second, unrolled copy of the step only to count FLOPs (it is never compiled).
"""

from __future__ import annotations

import contextlib
import contextvars

_UNROLL: contextvars.ContextVar = contextvars.ContextVar("tidar_scan_unroll", default=False)


@contextlib.contextmanager
def unrolled_scans():
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def scan_unroll() -> bool | int:
    """The ``unroll`` argument for ``lax.scan`` (1 = a loop; True = straight-line code)."""
    return True if _UNROLL.get() else 1
