"""Checkpoint I/O, one home: run checkpoints (``run``), params checkpoints (``params``), the metadata record every
writer emits and one reader parses (``metadata``), the inference bundle (``bundle``) and the one atomic-write helper
(``atomic``). Nothing here imports ``tidar_jax.train`` or ``tidar_jax.hf``: loading any checkpoint kind, HF
directories included, is ``tidar_jax.loading``, one floor above both.
"""

from tidar_jax.checkpoint.bundle import InferenceBundle
from tidar_jax.checkpoint.metadata import CheckpointMeta, read_meta, write_meta

__all__ = ["CheckpointMeta", "InferenceBundle", "read_meta", "write_meta"]
