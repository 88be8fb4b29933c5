"""One entry point to load any checkpoint kind for inference: HF dir, params checkpoint, or training run dir."""

from __future__ import annotations

import os

from tidar_jax.checkpoint.bundle import InferenceBundle


class CheckpointNotFound(FileNotFoundError):
    pass


def checkpoint_kind(path: str) -> str:
    """'hf' | 'params' | 'run'; raises ``CheckpointNotFound`` with a one-line reason otherwise."""
    from tidar_jax.checkpoint.metadata import MODEL_CONFIG
    from tidar_jax.checkpoint.params import is_params_dir
    from tidar_jax.checkpoint.run import CHECKPOINTS

    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFound(f"checkpoint {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if is_params_dir(path):
        return "params"
    if os.path.isdir(os.path.join(path, CHECKPOINTS)) or os.path.isfile(os.path.join(path, MODEL_CONFIG)) \
            or os.path.basename(os.path.normpath(path)).isdigit():
        return "run"
    raise CheckpointNotFound(
        f"checkpoint {path!r}: not a training run dir, a step checkpoint, a params checkpoint "
        "(model_config.json + params/) or a Hugging Face dir (config.json)")


def load_for_inference(path: str, mesh=None, **hf_kwargs) -> InferenceBundle:
    kind = checkpoint_kind(path)
    if kind == "hf":
        from tidar_jax.hf import load_hf_dir
        return load_hf_dir(path, mesh=mesh, **hf_kwargs)
    if kind == "params":
        from tidar_jax.checkpoint.params import load_params_bundle
        return load_params_bundle(path, mesh=mesh)
    from tidar_jax.checkpoint.run import load_run
    return load_run(path, mesh=mesh)
