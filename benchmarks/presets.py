"""Random-init model presets of the benchmarks, by name: owned by ``tidar_jax.presets`` (jax-free)."""

from tidar_jax.presets import MODEL_SHAPES, PRESETS  # noqa: F401
