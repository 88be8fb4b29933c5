"""Checkpoint I/O, one home: run checkpoints (``run``), params checkpoints (``params``), the metadata record every
writer emits and one reader parses (``metadata``), the inference bundle (``bundle``), loading any kind for
inference (``load``) and the one atomic-write helper (``atomic``). Nothing here imports ``tidar_jax.train``.
"""

from tidar_jax.checkpoint.bundle import InferenceBundle
from tidar_jax.checkpoint.load import CheckpointNotFound, checkpoint_kind, load_for_inference
from tidar_jax.checkpoint.metadata import CheckpointMeta, read_meta, write_meta

__all__ = ["CheckpointMeta", "CheckpointNotFound", "InferenceBundle", "checkpoint_kind", "load_for_inference",
           "read_meta", "write_meta"]
