"""Run-dir checkpoints: orbax ``CheckpointManager`` with Composite items, restore with target shardings, fallback.

Layout: ``RUN/checkpoints/<step>/{state,meta,data}`` where ``state`` is the train state (pure dicts: params,
optimizer state, step), ``meta`` a JSON dict (step, tokens seen, resolved config) and ``data`` the grain iterator
state of every process.  orbax writes a step into a temp dir and renames it when complete, so a save interrupted by
kill -9 never shows up as a step; a step that exists but cannot be read (corrupt files) is skipped with a warning
and the one before it is used.  Beside ``checkpoints/`` the run dir holds the checkpoint record
(``model_config.json`` + ``meta.json``, ``tidar_jax.checkpoint.metadata``), the resolved training config
(``config.yaml``), the data manifest summary and the tokenizer.
"""

from __future__ import annotations

import logging
import os
import warnings

import orbax.checkpoint as ocp

from tidar_jax.checkpoint.atomic import copy_file, write_json, write_text
from tidar_jax.checkpoint.bundle import InferenceBundle
from tidar_jax.checkpoint.metadata import MODEL_CONFIG, CheckpointMeta, read_meta, write_meta
from tidar_jax.checkpoint.params import restore_target, state_from_pure
from tidar_jax.config import ModelConfig

log = logging.getLogger("tidar_jax.checkpoint")

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.json"
RUN_CONFIG = "config.yaml"
DATA_MANIFEST = "data_manifest.json"


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one is used."""


def _data_args(data_iter, restore: bool):
    import grain

    if data_iter is None:
        return {}
    return {"data": grain.checkpoint.CheckpointRestore(data_iter) if restore
            else grain.checkpoint.CheckpointSave(data_iter)}


class RunCheckpoints:
    """The checkpoints of one run dir (every process of a multi-host run opens the same directory)."""

    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(run_dir), CHECKPOINTS)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, data_iter=None, force: bool = False) -> bool:
        """Start a (possibly async) save; the state arrays are copied before this returns, so they may be donated."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  **_data_args(data_iter, restore=False))
        return self.manager.save(step, args=args, force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state, data_iter=None):
        """``(step, state, meta)`` from the newest readable checkpoint (``None`` when there is none).

        ``abstract_state`` holds ``jax.ShapeDtypeStruct``s with the *target* shardings, so the state lands on the
        current mesh whatever mesh wrote it.  ``data_iter`` (if given) is advanced in place to the saved position.
        """
        for step in reversed(self.steps()):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
                                      **_data_args(data_iter, restore=True))
            try:
                restored = self.manager.restore(step, args=args)
                meta = restored["meta"]
                if int(meta["step"]) != step or int(restored["state"]["step"]) != step:
                    raise ValueError(f"meta/state step {meta['step']}/{int(restored['state']['step'])} != {step}")
            except Exception as e:  # any unreadable checkpoint: fall back to the previous one
                message = (f"checkpoint {os.path.join(self.directory, str(step))} cannot be restored "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                           "falling back to the previous checkpoint")
                warnings.warn(message, CheckpointFallbackWarning, stacklevel=2)
                log.warning(message)
                continue
            return step, restored["state"], meta
        return None

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def write_run_files(run_dir: str, meta: CheckpointMeta, run_config_yaml: str, data_manifest: dict,
                    tokenizer_path: str | None) -> None:
    """The files beside ``checkpoints/`` (each replaced atomically): the checkpoint record, the resolved training
    config, the data manifest summary and the tokenizer."""
    write_meta(run_dir, meta)
    write_text(os.path.join(run_dir, RUN_CONFIG), run_config_yaml)
    write_json(os.path.join(run_dir, DATA_MANIFEST), data_manifest)
    if tokenizer_path and os.path.isfile(tokenizer_path):
        copy_file(tokenizer_path, os.path.join(run_dir, TOKENIZER))


def run_dir_problem(path: str) -> str | None:
    """Why an existing directory cannot be a run dir to resume (None when it can: empty, unrelated or a run)."""
    import json

    import yaml

    checkpoints = os.path.join(path, CHECKPOINTS)
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        return f"{CHECKPOINTS} is not a directory (a damaged run dir)"
    for name, parse in ((RUN_CONFIG, yaml.safe_load), (MODEL_CONFIG, json.load)):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        try:
            with open(file) as f:
                value = parse(f)
        except (OSError, ValueError, yaml.YAMLError) as e:
            return f"{name} cannot be read ({type(e).__name__}; a damaged run dir)"
        if not isinstance(value, dict):
            return f"{name} is not a mapping (a damaged run dir)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Inference loading (params only)
# ----------------------------------------------------------------------------------------------------------------

def run_and_steps(path: str) -> tuple[str, list[str]]:
    """(run_dir, candidate step dirs newest first) for a run dir or one ``checkpoints/<step>`` dir."""
    path = os.path.abspath(path)
    base = os.path.basename(os.path.normpath(path))
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINTS:
        return os.path.dirname(os.path.dirname(path)), [path]
    ckpt_dir = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{path}: not a training run dir (no {CHECKPOINTS}/) nor a {CHECKPOINTS}/<step> dir")
    steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{path}: the run has no completed checkpoint yet")
    return path, [os.path.join(ckpt_dir, str(s)) for s in steps]


def restore_step_params(step_dir: str, cfg: ModelConfig, mesh=None):
    """``(graphdef, nnx.State)``: only the params of a train-state checkpoint (no optimizer state is read)."""
    from tidar_jax.layer_layout import holds_unrolled_layers, plain_tree, stack_unrolled, unrolled_target

    graphdef, abstract, target = restore_target(cfg, mesh)
    path = os.path.join(step_dir, "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = plain_tree(getattr(ckptr.metadata(path), "item_metadata", None))
        item = {"params": target}
        unrolled = isinstance(meta, dict) and holds_unrolled_layers(meta.get("params"))
        if unrolled:  # a run written before the layer stack was scanned
            item = {"params": unrolled_target(target, meta["params"])}
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    params = stack_unrolled(restored["params"], target) if unrolled else restored["params"]
    return graphdef, state_from_pure(abstract, params)


def load_run(run_or_checkpoint_dir: str, mesh=None) -> InferenceBundle:
    """The newest readable checkpoint's params of a run dir (or one ``checkpoints/<step>`` dir) as a bundle."""
    run_dir, step_dirs = run_and_steps(run_or_checkpoint_dir)
    if not os.path.isfile(os.path.join(run_dir, MODEL_CONFIG)):
        raise FileNotFoundError(f"{run_dir}: no {MODEL_CONFIG} (not a training run dir)")
    meta = read_meta(run_dir)
    errors = []
    for step_dir in step_dirs:
        try:
            graphdef, params = restore_step_params(step_dir, meta.config, mesh)
        except Exception as e:
            errors.append(f"{step_dir}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            warnings.warn(f"checkpoint {step_dir} cannot be restored ({errors[-1]}); trying the previous one",
                          CheckpointFallbackWarning, stacklevel=2)
            continue
        tokenizer = None
        tok_path = os.path.join(run_dir, TOKENIZER)
        if os.path.isfile(tok_path):
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(tok_path)
        return InferenceBundle(config=meta.config, graphdef=graphdef, params=params, tokenizer=tokenizer,
                               eos_token_id=meta.eos_token_id, eos_token_ids=meta.eos_token_ids, source=step_dir,
                               step=int(os.path.basename(step_dir)))
    raise FileNotFoundError(f"{run_or_checkpoint_dir}: no checkpoint could be restored: {'; '.join(errors)}")
