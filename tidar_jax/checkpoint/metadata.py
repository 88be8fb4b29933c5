"""The one metadata record of a checkpoint: what every writer emits (``write_meta``) and one reader parses
(``read_meta``), for params checkpoints and training run dirs alike.

On disk: ``model_config.json`` (the ``ModelConfig``; its ``block_size`` is the block size the weights were trained
with, null for an AR-only model) and ``meta.json`` (``format``, ``step``, EOS ids, ``source`` and the HF-only fields
an HF export writes back). Format 1 (before ``tidar_jax.checkpoint``) is still read: a params checkpoint's
``meta.json`` carried ``trained_block_size`` beside the config's block size, and a run dir had no ``meta.json``
(its EOS id was in ``data_manifest.json``, an AR-only run was recognised by ``train.objective`` in ``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import os

from tidar_jax.checkpoint.atomic import write_json
from tidar_jax.config import ModelConfig

FORMAT = 2
MODEL_CONFIG = "model_config.json"
META = "meta.json"
# format 1 run dirs only
_RUN_CONFIG = "config.yaml"
_DATA_MANIFEST = "data_manifest.json"


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    config: ModelConfig
    step: int | None = None
    eos_token_ids: tuple[int, ...] | None = None  # every EOS id (the first is the default)
    source: str | None = None  # where the weights came from (e.g. the imported HF dir)
    hf: dict | None = None  # what a server reads beside the weights, kept for export (tidar_jax.hf.serving)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None


def eos_tuple(value) -> tuple[int, ...] | None:
    """An EOS id, a list of them or None -> a tuple of ints or None."""
    if value is None:
        return None
    ids = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids or None


def write_meta(directory: str, meta: CheckpointMeta) -> None:
    write_json(os.path.join(directory, MODEL_CONFIG), meta.config.to_dict())
    write_json(os.path.join(directory, META), {
        "format": FORMAT, "step": meta.step,
        "eos_token_ids": None if meta.eos_token_ids is None else list(meta.eos_token_ids),
        "source": meta.source, "hf": meta.hf})


class DamagedCheckpoint(ValueError):
    """A checkpoint's record cannot be read; the message is one line naming the file."""


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DamagedCheckpoint(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a damaged checkpoint") \
            from None
    except UnicodeDecodeError:
        raise DamagedCheckpoint(f"{path}: not UTF-8 text; a damaged checkpoint") from None


def read_model_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG} (not a checkpoint of this project)")
    record = _read_json(path)
    if not isinstance(record, dict):
        raise DamagedCheckpoint(f"{path}: expected a JSON object; a damaged checkpoint")
    return ModelConfig.from_dict(record)


def read_meta(directory: str) -> CheckpointMeta:
    """The record of a params checkpoint or a run dir (format 2, or format 1 as written before)."""
    cfg = read_model_config(directory)
    path = os.path.join(directory, META)
    raw = _read_json(path) if os.path.isfile(path) else None
    if raw is not None and not isinstance(raw, dict):
        raise DamagedCheckpoint(f"{path}: expected a JSON object; a damaged checkpoint")
    if raw is not None and raw.get("format") == FORMAT:
        return CheckpointMeta(cfg, raw.get("step"), eos_tuple(raw.get("eos_token_ids")), raw.get("source"),
                              raw.get("hf"))
    if raw is not None:  # format 1 params checkpoint
        if "trained_block_size" in raw:  # null there meant "none recorded": no trained block size
            cfg = cfg.replace(block_size=raw["trained_block_size"])
        return CheckpointMeta(cfg, raw.get("step"), eos_tuple(raw.get("eos_token_id")), raw.get("source"),
                              raw.get("hf"))
    # format 1 run dir
    eos = None
    manifest = os.path.join(directory, _DATA_MANIFEST)
    if os.path.isfile(manifest):
        eos = _read_json(manifest).get("eos_token_id")
    run_config = os.path.join(directory, _RUN_CONFIG)
    if os.path.isfile(run_config):
        import yaml

        with open(run_config) as f:
            objective = ((yaml.safe_load(f) or {}).get("train") or {}).get("objective", "tidar")
        if objective != "tidar":  # an AR-only model drafts nothing
            cfg = cfg.replace(block_size=None)
    return CheckpointMeta(cfg, eos_token_ids=eos_tuple(eos))
