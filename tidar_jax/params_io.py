"""Params-only checkpoints: ``model_config.json`` + orbax ``params/`` (+ ``tokenizer.json``), written atomically.

This is the interchange format between ``convert import-hf``, ``train.py --init-from`` and ``decode.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
from flax import nnx

from tidar_jax.bundle import InferenceBundle
from tidar_jax.config import ModelConfig
from tidar_jax.model.functional import abstract_model
from tidar_jax.sharding import state_shardings

MODEL_CONFIG = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER = "tokenizer.json"
META = "meta.json"


def is_params_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_params(out_dir: str, cfg: ModelConfig, params_state, tokenizer_path: str | None = None,
                extra: dict | None = None) -> str:
    """Write a params checkpoint to ``out_dir`` atomically (temp dir beside it, then rename)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"output {out_dir} already exists; choose a new path or remove it first")
    pure = params_state.to_pure_dict() if hasattr(params_state, "to_pure_dict") else params_state
    # checked before orbax starts: a failure inside its async save can leave a background thread writing into the
    # temp dir after it was removed
    leaves = jax.tree.leaves(pure)
    if not leaves or not all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves):
        raise TypeError(f"params_state: expected a tree of arrays (an nnx.State or its pure dict), got "
                        f"{type(params_state).__name__} with leaves {[type(x).__name__ for x in leaves[:4]]}")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), pure)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER))
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(extra or {}, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model_config(path: str) -> ModelConfig:
    with open(os.path.join(path, MODEL_CONFIG)) as f:
        return ModelConfig.from_dict(json.load(f))


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


def restore_params(params_path: str, cfg: ModelConfig, mesh=None):
    """Restore a pure-dict params tree saved by orbax into an ``nnx.State`` (sharded on ``mesh`` if given)."""
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
    """``(cfg, graphdef, state, meta)`` from a params checkpoint directory."""
    if not is_params_dir(path):
        raise FileNotFoundError(f"{path}: not a params checkpoint (expected {MODEL_CONFIG} and {PARAMS_DIR}/)")
    cfg = load_model_config(path)
    graphdef, state = restore_params(os.path.join(path, PARAMS_DIR), cfg, mesh)
    meta = {}
    if os.path.isfile(os.path.join(path, META)):
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    return cfg, graphdef, state, meta


def load_bundle(path: str, mesh=None) -> InferenceBundle:
    cfg, graphdef, state, meta = load_params(path, mesh)
    tokenizer = None
    tok_path = os.path.join(path, TOKENIZER)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tok_path)
    return InferenceBundle(config=cfg, graphdef=graphdef, params=state, tokenizer=tokenizer,
                           trained_block_size=meta.get("trained_block_size", cfg.block_size),
                           eos_token_id=meta.get("eos_token_id"), source=os.path.abspath(path), step=meta.get("step"))
