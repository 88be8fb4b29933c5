"""One entry point to load any checkpoint kind for inference: HF dir, params checkpoint, or training run dir.

It sits above both formats' homes (``tidar_jax.checkpoint`` for params checkpoints and run dirs, ``tidar_jax.hf``
for Hugging Face directories) so that neither imports the other's loader: ``tidar_jax.hf`` may use checkpoint
helpers (the bundle, the atomic write), ``tidar_jax.checkpoint`` never reaches up into ``tidar_jax.hf``.
"""

from __future__ import annotations

import os

from tidar_jax.checkpoint.bundle import InferenceBundle
from tidar_jax.checkpoint.metadata import MODEL_CONFIG
from tidar_jax.checkpoint.params import is_params_dir, load_params_bundle
from tidar_jax.checkpoint.run import CHECKPOINTS, load_run
from tidar_jax.hf.load import CONFIG_FILE, load_hf_dir


class CheckpointNotFound(FileNotFoundError):
    """The path is no checkpoint of any kind; the message is one line saying why."""


def checkpoint_kind(path: str) -> str:
    """'hf' | 'params' | 'run'; raises ``CheckpointNotFound`` with a one-line reason otherwise."""
    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFound(f"checkpoint {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
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
    """The weights, config and tokenizer of any checkpoint kind (``hf_kwargs`` go to ``load_hf_dir``)."""
    kind = checkpoint_kind(path)
    if kind == "hf":
        return load_hf_dir(path, mesh=mesh, **hf_kwargs)
    if kind == "params":
        return load_params_bundle(path, mesh=mesh)
    return load_run(path, mesh=mesh)


def serving_record(path: str) -> dict | None:
    """What a server reads beside the weights (``tidar_jax.hf.serving``), as this checkpoint carries it: read from
    an HF directory (checked), or the record a params checkpoint or run dir keeps (None when it keeps none)."""
    from tidar_jax.checkpoint.metadata import read_meta
    from tidar_jax.checkpoint.run import run_and_steps
    from tidar_jax.hf.load import read_hf_config
    from tidar_jax.hf.serving import read_source_record

    kind = checkpoint_kind(path)
    if kind == "hf":
        return read_source_record(path, read_hf_config(path))
    return read_meta(path if kind == "params" else run_and_steps(path)[0]).hf
