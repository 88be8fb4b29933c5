"""Training configuration: frozen, validated dataclasses loaded from a YAML preset plus dotted overrides.

``load_config("configs/tiny.yaml", ["optim.lr=3e-4", "train.steps=10"])`` -> ``TrainConfig``.
Every unknown key and every bad value raises ``ConfigError`` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from tidar_jax.config import ConfigError, ModelConfig, check_architecture, resolve_mask_token
from tidar_jax.draft_loss import POSITION_WEIGHTINGS

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """``ModelConfig`` fields plus how to initialise the weights.

    With ``init_from`` (an HF dir, ``pretrained:NAME`` or a params checkpoint) the architecture comes from that checkpoint; only the
    TiDAR fields given here (block_size, mask_token_id, dtype, param_dtype) and ``attention`` override it.
    ``mask_token_id: null`` takes the id from the data manifest.
    """

    arch: dict = dataclasses.field(default_factory=dict)  # ModelConfig keys as written in the YAML
    init_from: str | None = None
    remat: str = "none"  # a policy of tidar_jax.model.remat: none | full | qkvo | dots (old true/false: full/none)


@dataclasses.dataclass(frozen=True)
class DataSection:
    dir: str = "data/stdlib"
    prepare: bool = True  # build the corpus (idempotent) if ``dir`` has no manifest
    vocab_size: int = 4096  # tokenizer vocabulary when the corpus is prepared here
    # the tokenizer the corpus is prepared with: a tokenizer.json, an HF dir or pretrained:NAME (a model's own,
    # for continual pretraining from it); null: a byte-level BPE of vocab_size trained on the corpus
    tokenizer: str | None = None
    max_files: int | None = None
    max_bytes: int | None = None
    heldout_fraction: float = 0.05
    seq_len: int = 128
    global_batch: int = 8
    worker_count: int = 0
    prefetch: int = 2
    eval_batch_size: int = 8
    eval_batches: int = 4
    # documents: whole documents packed with segment ids (no attention or AR target across documents);
    # windows: fixed windows of the token stream. null: documents for a new run, windows for a run dir created
    # before this option existed (so it resumes with the same batches).
    packing: str | None = None
    # A weighted mixture of prepared dirs (same tokenizer): [{dir: ..., weight: ...}, ...]; null: data.dir alone.
    # Eval and the tokenizer come from the first source.
    sources: list | None = None
    # Self-generated draft data (tidar_jax/train/selfgen.py), for a TiDAR run initialised from an AR model
    # (model.init_from): selfgen_rows rows of the init model's greedy continuations of selfgen_prompt_tokens-token
    # train-split prompts, made once in <run dir>/selfgen and mixed into the train batches at selfgen_weight.
    # 0 rows = off (the paper's data).
    selfgen_rows: int = 0
    selfgen_prompt_tokens: int = 32
    selfgen_weight: float = 0.25


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    warmup_frac: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Mesh axis sizes; one axis may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    strict: bool = False  # a mesh axis that does not divide a dimension is an error (else: that dim replicates)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every: int = 10
    eval_every: int = 100
    progress: bool | None = None  # None: a tqdm bar only when stdout is a TTY
    tensorboard: bool = True
    decode_probe_prompts: int = 0  # held-out prompts decoded with TiDAR at the end of the run (0 = no probe)
    decode_probe_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """``jax.distributed`` options; ``enabled: auto`` initialises only when a cluster environment is detected."""

    enabled: str = "auto"  # auto | true | false
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list | None = None
    initialization_timeout: int = 300


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    seed: int = 0
    objective: str = "tidar"  # tidar | ar
    alpha: float = 1.0  # weight of the AR term: (alpha * ar + diff) / (1 + alpha)
    # draft-loss options (tidar_jax/draft_loss.py); all off = the paper's objective
    distill_weight: float = 0.0  # KL(sg(AR) || diffusion) at each target position
    distill_temperature: float = 1.0
    chain_weight: float = 0.0  # 1 - differentiable expected accepted fraction of a block's drafts
    position_weighting: str = "none"  # none | exponential (slot j of a block weighs position_decay**j)
    position_decay: float = 1.0
    loss_chunk: int = 0  # target positions per cross-entropy chunk (0 = whole sequence at once)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                arch = section.pop("arch")
                section = {**arch, **section}
            out[f.name] = section
        return out

    def replace(self, **dotted) -> "TrainConfig":
        """``cfg.replace(**{"optim.lr": 1e-4})`` -> a new validated config."""
        return from_dict(apply_overrides(self.to_dict(), dotted))

    def model_config(self, mask_token_id: int | None = None) -> ModelConfig:
        """The ``ModelConfig`` of a from-scratch model. ``mask_token_id``: the recorded id (the data manifest's),
        used when the YAML leaves it null. An AR-only run (``train.objective: ar``) records no block size."""
        arch = dict(self.model.arch)
        arch["mask_token_id"] = resolve_mask_token(arch.get("mask_token_id"), mask_token_id,
                                                   vocab_size=arch.get("vocab_size", ModelConfig.vocab_size))
        if arch["mask_token_id"] is None:
            raise ConfigError("model.mask_token_id is null and no data manifest supplies one")
        arch["block_size"] = self.trained_block_size(arch.get("block_size", ModelConfig.block_size))
        return ModelConfig.from_dict(arch)

    def trained_block_size(self, block_size: int | None) -> int | None:
        """The block size this run trains with, given the one the model would otherwise have (the YAML's, or the
        checkpoint's): None for an AR-only run, which trains no drafter."""
        return block_size if self.train.objective == "tidar" else None


def check_block_alignment(cfg: "TrainConfig", block_size: int | None) -> None:
    """The TiDAR layout cuts sequences (and loss chunks) into blocks: both must be multiples of ``block_size``."""
    if cfg.train.objective != "tidar":
        return
    if block_size is None:
        source = f" and model.init_from={cfg.model.init_from!r} records none" if cfg.model.init_from else ""
        raise ConfigError(f"model.block_size is null{source}: train.objective=tidar needs a block size; set "
                          "model.block_size")
    if cfg.data.seq_len % block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: must be a multiple of model.block_size={block_size}")
    if cfg.train.loss_chunk % block_size:
        raise ConfigError(f"train.loss_chunk={cfg.train.loss_chunk}: must be a multiple of model.block_size="
                          f"{block_size} (chunks align to blocks)")


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, annotation):
    """Check ``value`` against a field annotation (int/float/bool/str/list, optionally ``| None``)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)] if args else [annotation]
    base = base[0] if base else annotation
    base = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=null: a value is required ({base.__name__})")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: must be a number")
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # "enabled: true" reads as bool
            return "true" if value else "false"
        raise ConfigError(f"{key}={value!r}: must be a string")
    if base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}={value!r}: must be a list")
    if base is dict:
        return value
    raise AssertionError(f"unhandled annotation {annotation} for {key}")


def from_dict(values: dict[str, Any]) -> TrainConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; allowed: {sorted(_SECTIONS)}")
    sections = {}
    for name, field in _SECTIONS.items():
        raw = values.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {raw!r}")
        cls = field.default_factory().__class__
        types = _section_types(cls)
        raw = dict(raw)
        kwargs = {}
        if name == "model":
            arch = {k: raw.pop(k) for k in list(raw) if k in _MODEL_FIELDS}
            kwargs["arch"] = arch
            if "remat" in raw:  # a policy name; old configs say true/false
                from tidar_jax.model.remat import policy_name

                raw["remat"] = policy_name(raw["remat"])
        unknown = sorted(set(raw) - (set(types) - {"arch"}))
        if unknown:
            allowed = sorted((set(types) - {"arch"}) | (_MODEL_FIELDS if name == "model" else set()))
            raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; allowed in {name}: {allowed}")
        for key, value in raw.items():
            kwargs[key] = _coerce(f"{name}.{key}", value, types[key])
        sections[name] = cls(**kwargs)
    return TrainConfig(**sections)


def validate(cfg: TrainConfig) -> None:
    """Value checks that do not need the data or devices (those are checked where they become known)."""

    def need(cond, key, value, allowed):
        if not cond:
            raise ConfigError(f"{key}={value!r}: {allowed}")

    t, d, o, m, c, lg, ds = cfg.train, cfg.data, cfg.optim, cfg.mesh, cfg.checkpoint, cfg.logging, cfg.distributed
    need(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    need(t.objective in ("tidar", "ar"), "train.objective", t.objective, "must be one of tidar, ar")
    need(t.alpha >= 0, "train.alpha", t.alpha, "must be >= 0")
    need(t.distill_weight >= 0, "train.distill_weight", t.distill_weight, "must be >= 0 (0 = off)")
    need(t.distill_temperature > 0, "train.distill_temperature", t.distill_temperature, "must be > 0")
    need(t.chain_weight >= 0, "train.chain_weight", t.chain_weight, "must be >= 0 (0 = off)")
    need(t.position_weighting in POSITION_WEIGHTINGS, "train.position_weighting", t.position_weighting,
         "must be one of " + ", ".join(POSITION_WEIGHTINGS))
    need(0 < t.position_decay <= 1, "train.position_decay", t.position_decay, "must be in (0, 1]")
    drafting = t.distill_weight > 0 or t.chain_weight > 0 or t.position_weighting != "none"
    need(not drafting or t.objective == "tidar", "train.objective", t.objective,
         "draft-loss options (distill_weight, chain_weight, position_weighting) need objective tidar")
    need(t.loss_chunk >= 0, "train.loss_chunk", t.loss_chunk, "must be >= 0 (0 = no chunking)")
    need(t.loss_chunk == 0 or d.seq_len % t.loss_chunk == 0, "train.loss_chunk", t.loss_chunk,
         f"must divide data.seq_len={d.seq_len}")
    need(not drafting or t.loss_chunk == 0, "train.loss_chunk", t.loss_chunk,
         "must be 0 when draft-loss options are on (the chunked loss does not compute draft terms yet)")
    need(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be >= 2")
    need(d.global_batch >= 1, "data.global_batch", d.global_batch, "must be >= 1")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    need(d.eval_batches >= 0, "data.eval_batches", d.eval_batches, "must be >= 0")
    need(d.worker_count >= 0, "data.worker_count", d.worker_count, "must be >= 0")
    need(0 < d.heldout_fraction < 1, "data.heldout_fraction", d.heldout_fraction, "must be in (0, 1)")
    need(d.packing in (None, "documents", "windows"), "data.packing", d.packing,
         "must be documents, windows or null (documents for new runs)")
    if d.sources is not None:
        need(len(d.sources) >= 1 and all(isinstance(x, dict) and set(x) <= {"dir", "weight"} and "dir" in x
                                         and isinstance(x.get("weight", 1.0), (int, float))
                                         and not isinstance(x.get("weight", 1.0), bool)
                                         and x.get("weight", 1.0) > 0 for x in d.sources),
             "data.sources", d.sources, "must be a non-empty list of {dir: PATH, weight: NUMBER > 0}")
    need(d.selfgen_rows >= 0, "data.selfgen_rows", d.selfgen_rows, "must be >= 0 (0 = off)")
    if d.selfgen_rows:
        need(t.objective == "tidar" and cfg.model.init_from is not None, "data.selfgen_rows", d.selfgen_rows,
             "self-generated draft data needs train.objective=tidar and model.init_from (the AR model that writes it)")
        need(0 < d.selfgen_weight < 1, "data.selfgen_weight", d.selfgen_weight, "must be in (0, 1)")
        room = d.seq_len - (cfg.model.arch.get("block_size") or 1)
        need(1 <= d.selfgen_prompt_tokens < room, "data.selfgen_prompt_tokens", d.selfgen_prompt_tokens,
             f"must be in [1, data.seq_len - model.block_size = {room})")
    need(o.name in ("adamw", "adam"), "optim.name", o.name, "must be one of adamw, adam")
    need(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "must be one of cosine, constant")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    need(0 <= o.warmup_frac < 1, "optim.warmup_frac", o.warmup_frac, "must be in [0, 1)")
    need(0 <= o.b1 < 1, "optim.b1", o.b1, "must be in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", o.b2, "must be in [0, 1)")
    need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", o.clip_norm, "must be > 0 or null (no clipping)")
    need(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "must be >= 1")
    need(d.global_batch % o.grad_accum == 0, "optim.grad_accum", o.grad_accum,
         f"must divide data.global_batch={d.global_batch}")
    axes = (m.data, m.fsdp, m.tensor)
    need(all(a == -1 or a >= 1 for a in axes), "mesh", dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor),
         "every axis must be >= 1, or -1 for 'the remaining devices'")
    need(sum(a == -1 for a in axes) <= 1, "mesh", dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor),
         "at most one axis may be -1")
    need(c.every >= 1, "checkpoint.every", c.every, "must be >= 1")
    need(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1 (keep at least the latest checkpoint)")
    need(lg.every >= 1, "logging.every", lg.every, "must be >= 1")
    need(lg.eval_every >= 0, "logging.eval_every", lg.eval_every, "must be >= 0 (0 = evaluate only at the end)")
    need(lg.decode_probe_prompts >= 0, "logging.decode_probe_prompts", lg.decode_probe_prompts, "must be >= 0")
    need(lg.decode_probe_tokens >= 1, "logging.decode_probe_tokens", lg.decode_probe_tokens, "must be >= 1")
    need(ds.enabled in ("auto", "true", "false"), "distributed.enabled", ds.enabled, "must be one of auto, true, false")
    arch = cfg.model.arch
    unknown = sorted(set(arch) - _MODEL_FIELDS)
    need(not unknown, "model", unknown, f"unknown model keys; allowed: {sorted(_MODEL_FIELDS)}")
    if cfg.model.init_from is None:
        # validate the architecture now (mask_token_id may still come from the manifest)
        check_architecture(arch)
        check_block_alignment(cfg, arch.get("block_size", ModelConfig.block_size))


def apply_overrides(values: dict, overrides) -> dict:
    values = {k: dict(v or {}) for k, v in values.items()}
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for dotted, value in items:
        parts = dotted.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {dotted!r}: expected section.key=value (e.g. optim.lr=3e-4)")
        section, key = parts
        if section not in _SECTIONS:
            raise ConfigError(f"override {dotted!r}: unknown section {section!r}; allowed: {sorted(_SECTIONS)}")
        values.setdefault(section, {})[key] = value
    return values


def split_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_preset(path: str | None) -> dict:
    """The parsed YAML of a preset ({} when ``path`` is None), with one clear error for a missing or bad file."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping of sections")
    return values


def load_config(path: str | None, overrides=()) -> TrainConfig:
    """Read a YAML preset (or defaults when ``path`` is None) and apply ``section.key=value`` overrides.

    A preset's ``phases`` list (the AR-then-TiDAR recipe, ``tidar_jax/train/phases.py``) is not applied here: this
    is the preset's base sections, i.e. the preset trained from scratch in one run (``train.py --no-phases``)."""
    values = dict(read_preset(path))
    values.pop("phases", None)
    return from_dict(apply_overrides(values, list(overrides)))


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
