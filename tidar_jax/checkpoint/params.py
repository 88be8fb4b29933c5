"""Params checkpoints: ``model_config.json`` + ``meta.json`` (``tidar_jax.checkpoint.metadata``) + orbax
``params/`` (+ ``tokenizer.json``), written atomically.

This is the interchange format between ``convert import-hf``, ``train.py --init-from`` and ``decode.py``.
"""

from __future__ import annotations

import os
import shutil

import jax
from flax import nnx

from tidar_jax.checkpoint.atomic import atomic_dir
from tidar_jax.checkpoint.metadata import MODEL_CONFIG, CheckpointMeta, read_meta, write_meta
from tidar_jax.config import ModelConfig
from tidar_jax.model.functional import abstract_model
from tidar_jax.sharding import state_shardings

PARAMS_DIR = "params"
TOKENIZER = "tokenizer.json"


def is_params_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_params(out_dir: str, meta: CheckpointMeta | ModelConfig, params_state, tokenizer_path: str | None = None,
                tokenizer=None) -> str:
    """Write a params checkpoint to ``out_dir`` (which must not exist) atomically. ``meta``: the record (a bare
    ``ModelConfig`` records nothing else); the tokenizer is a ``tokenizer.json`` path or a ``tokenizers.Tokenizer``."""
    import orbax.checkpoint as ocp

    from tidar_jax.output_paths import check_new_dir

    if isinstance(meta, ModelConfig):
        meta = CheckpointMeta(meta)
    out_dir = check_new_dir(out_dir)
    pure = params_state.to_pure_dict() if hasattr(params_state, "to_pure_dict") else params_state
    # checked before orbax starts: a failure inside its async save can leave a background thread writing into the
    # temp dir after it was removed
    leaves = jax.tree.leaves(pure)
    if not leaves or not all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves):
        raise TypeError(f"params_state: expected a tree of arrays (an nnx.State or its pure dict), got "
                        f"{type(params_state).__name__} with leaves {[type(x).__name__ for x in leaves[:4]]}")
    with atomic_dir(out_dir) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), pure)
            ckptr.wait_until_finished()
        write_meta(tmp, meta)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER))
        elif tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER))
    return out_dir


def restore_target(cfg: ModelConfig, mesh=None):
    """``(graphdef, abstract_state, target_pure)``: the pure-dict restore target with each leaf's target sharding
    (the rules table on ``mesh``, or the first device), so orbax reads every tensor straight into place."""
    graphdef, abstract = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract)
    if mesh is not None:
        shardings_pure = nnx.to_pure_dict(state_shardings(abstract, mesh))
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings_pure = jax.tree.map(lambda a: dev, abstract_pure)
    target_pure = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract_pure, shardings_pure)
    return graphdef, abstract, target_pure


def state_from_pure(abstract, pure):
    """An ``nnx.State`` shaped like ``abstract`` holding the arrays of the pure dict ``pure``."""
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return state


def restore_params_item(params_path: str, cfg: ModelConfig, mesh=None):
    """``(graphdef, nnx.State)`` from the orbax ``params/`` item of a params checkpoint (sharded on ``mesh``)."""
    import orbax.checkpoint as ocp

    from tidar_jax.layer_layout import holds_unrolled_layers, plain_tree, stack_unrolled, unrolled_target

    graphdef, abstract, target_pure = restore_target(cfg, mesh)
    path = os.path.abspath(params_path)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        meta = plain_tree(getattr(meta, "item_metadata", meta))
        if holds_unrolled_layers(meta):  # written before the layer stack was scanned
            restored = stack_unrolled(ckptr.restore(path, unrolled_target(target_pure, meta)), target_pure)
        else:
            restored = ckptr.restore(path, target_pure)
    return graphdef, state_from_pure(abstract, restored)


def load_params(path: str, mesh=None):
    """``(cfg, graphdef, state, meta)`` from a params checkpoint directory (``meta``: its ``CheckpointMeta``)."""
    if not is_params_dir(path):
        raise FileNotFoundError(f"{path}: not a params checkpoint (expected {MODEL_CONFIG} and {PARAMS_DIR}/)")
    meta = read_meta(path)
    graphdef, state = restore_params_item(os.path.join(path, PARAMS_DIR), meta.config, mesh)
    return meta.config, graphdef, state, meta


def load_params_bundle(path: str, mesh=None):
    from tidar_jax.checkpoint.bundle import InferenceBundle

    cfg, graphdef, state, meta = load_params(path, mesh)
    tokenizer = None
    tok_path = os.path.join(path, TOKENIZER)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tok_path)
    return InferenceBundle(config=cfg, graphdef=graphdef, params=state, tokenizer=tokenizer,
                           eos_token_id=meta.eos_token_id, eos_token_ids=meta.eos_token_ids,
                           source=os.path.abspath(path), step=meta.step)
