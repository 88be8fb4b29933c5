"""The name a custom kernel gives its ``pallas_call``: its base name and the sizes its work follows from.

XLA cannot see inside a Pallas kernel, and the call's name is the one thing of it that survives compilation on
both jax 0.10 and 0.11 (in the custom call's ``op_name`` and its backend_config ``name``; Pallas's Triton lowering
drops ``cost_estimate=``, and ``metadata=`` sits inside a compressed proto on 0.11). So each kernel writes the
sizes that decide its work into its name, ``<base>__<size>_<integer>...``, and whoever reads the compiled program
(``tidar_jax.analysis.kernel_costs``) can count that work without the kernel knowing it is read.
"""

from __future__ import annotations


def work_name(base: str, **sizes: int) -> str:
    """``base`` followed by ``__<size>_<value>`` for each size (lowercase letters, non-negative integers)."""
    return base + "".join(f"__{k}_{int(v)}" for k, v in sizes.items())


__all__ = ["work_name"]
