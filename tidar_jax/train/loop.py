"""The training loop: data -> sharded step -> logs/eval/checkpoints, with automatic resume from the run dir.

``train()`` is ``setup()`` (every check made once, then the model, the step, the state and the iterators; a run
dir that setup created is removed again when setup fails) followed by ``run_loop()``, whose steps call small hooks
in order: logging, evaluation, checkpointing, preemption.

Resume is exact: the batch order is a pure function of (data, seed, step) and the grain iterator state is saved
with every checkpoint, the train step has no randomness, and params/optimizer state are restored bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np

from tidar_jax.checkpoint import run as ck
from tidar_jax.checkpoint.metadata import CheckpointMeta, eos_tuple
from tidar_jax.config import ConfigError, ModelConfig, resolve_mask_token
from tidar_jax.draft_loss import DraftLoss
from tidar_jax.train.config import TrainConfig, check_block_alignment, dump_yaml
from tidar_jax.train.distributed import initialize, resolve_mesh_shape

log = logging.getLogger("tidar_jax.train")

# Preemption drills and the kill -9 resume test: seconds to sleep after every step (0 = off).
_STEP_SLEEP = float(os.environ.get("TIDAR_TRAIN_STEP_SLEEP", "0") or 0)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is left as it was."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the last completed step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass
class RunResult:
    run_dir: str
    start_step: int
    final_step: int
    resumed: bool
    wall_s: float
    train_metrics: dict  # mean over the last logging interval
    eval_metrics: dict
    unigram_entropy: float | None
    losses: list  # (step, loss) of every step run by this call
    decode_probe: dict | None = None


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------

def unigram_cross_entropy(data_dir: str, manifest: dict) -> float:
    """Cross-entropy (nats/token) of the held-out tokens under add-one-smoothed train-split unigram frequencies:
    the loss of the best context-free predictor, the bar a model that learns anything must clear."""
    vocab = int(manifest["vocab_size"])
    dtype = np.dtype(manifest["dtype"])

    from tidar_jax.data.shards import split_parts

    def bincount(split):
        return sum(np.bincount(np.memmap(p["path"], dtype=dtype, mode="r", shape=(p["tokens"],)), minlength=vocab)
                   for p in split_parts(data_dir, manifest, split) if p["tokens"]).astype(np.float64)

    counts = bincount("train") + 1.0
    logp = np.log(counts / counts.sum())
    held = bincount("eval")
    return float(-(held * logp).sum() / held.sum())


class _SignalFlag:
    """SIGTERM/SIGINT set a flag that the loop checks between steps (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """A tqdm bar on a TTY (or when asked); otherwise one line per logging interval."""

    def __init__(self, enabled: bool, start: int, total: int, show: bool):
        self.bar = None
        self.show = show
        if enabled and show:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def step(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def message(self, line: str, postfix: dict | None = None):
        if not self.show:
            return
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)
            else:
                self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Model and data setup
# ----------------------------------------------------------------------------------------------------------------

def prepare_data(cfg: TrainConfig) -> tuple[str, dict]:
    from tidar_jax.data import load_manifest, prepare_corpus

    data_dir = os.path.abspath(cfg.data.dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"data.dir={cfg.data.dir!r}: is a file, not a directory (a prepared corpus is a directory)")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        if not cfg.data.prepare:
            raise ConfigError(f"data.dir={cfg.data.dir!r} holds no prepared corpus and data.prepare=false; run "
                              "`python -m tidar_jax.data.prepare --out DIR` or set data.prepare=true")
        print(f"preparing the corpus in {data_dir} (once; later runs reuse it) ...", flush=True)
        prepare_corpus(data_dir, vocab_size=cfg.data.vocab_size, heldout_fraction=cfg.data.heldout_fraction,
                       seed=0, max_files=cfg.data.max_files, max_bytes=cfg.data.max_bytes,
                       tokenizer=cfg.data.tokenizer)
    return data_dir, load_manifest(data_dir)


def resolve_pretrained(cfg: TrainConfig, show: bool) -> TrainConfig:
    """``pretrained:NAME`` in ``model.init_from`` / ``data.tokenizer`` -> the model's HF dir, fetched on first use."""
    from tidar_jax.pretrained import FetchError, resolve

    log = (lambda m: print(m, flush=True)) if show else (lambda m: None)
    try:
        return cfg.replace(**{"model.init_from": resolve(cfg.model.init_from, log),
                              "data.tokenizer": resolve(cfg.data.tokenizer, log)})
    except FetchError as e:
        raise ConfigError(str(e)) from None


def resolve_packing(cfg: TrainConfig, run_dir: str) -> str:
    """``data.packing: null`` -> documents for a new run, windows for a run dir whose saved config predates the
    option (its ``data`` section has no ``packing`` key), so an old run resumes with the batches it started with."""
    if cfg.data.packing is not None:
        return cfg.data.packing
    saved = os.path.join(run_dir, ck.RUN_CONFIG)
    if os.path.isfile(saved):
        import yaml

        with open(saved) as f:
            data = (yaml.safe_load(f) or {}).get("data") or {}
        if "packing" not in data:
            return "windows"
        return data["packing"] or "documents"
    return "documents"


def data_sources(cfg: TrainConfig, data_dir: str, selfgen_dir: str | None = None):
    """The train iterator's ``data_dir`` argument: the dir, or ``[(dir, weight), ...]`` for a mixture.
    ``selfgen_dir``: the self-generated draft data (``tidar_jax.train.selfgen``), mixed in at
    ``data.selfgen_weight`` of the rows."""
    if not cfg.data.sources and selfgen_dir is None:
        return data_dir
    from tidar_jax.data.pipeline import mixture_manifests, normalize_sources

    listed = cfg.data.sources or [{"dir": data_dir, "weight": 1.0}]
    sources = normalize_sources([{"dir": os.path.abspath(x["dir"]), "weight": x.get("weight", 1.0)} for x in listed])
    if selfgen_dir is not None:
        total, w = sum(x for _, x in sources), cfg.data.selfgen_weight
        sources = [(d, x * (1 - w) / total) for d, x in sources] + [(os.path.abspath(selfgen_dir), w)]
    mixture_manifests(sources)  # one clear error if the tokenizers differ
    return sources


def build_model_config(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    """Architecture of a from-scratch run (checked against the tokenizer of the data)."""
    mcfg = cfg.model_config(mask_token_id=manifest.get("mask_token_id"))
    if mcfg.vocab_size < int(manifest["vocab_size"]):
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size}: smaller than the data tokenizer's vocabulary "
                          f"({manifest['vocab_size']}); set model.vocab_size >= {manifest['vocab_size']}")
    return mcfg


def check_same_tokenizer(cfg: TrainConfig, kind: str, data_dir: str | None) -> None:
    """A run or params checkpoint records the tokenizer it was trained with (a copy of its corpus's); the data of
    this run must use the same one, or every token id means another string. (An HF dir's tokenizer is the
    reference the corpus was prepared with; its file format differs, so it is not compared here.)"""
    from tidar_jax.checkpoint.run import TOKENIZER

    if kind not in ("run", "params") or data_dir is None:
        return
    ours = os.path.join(data_dir, "tokenizer.json")
    theirs = _checkpoint_tokenizer(cfg.model.init_from, kind, TOKENIZER)
    if theirs is None or not os.path.isfile(ours):
        return
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        if a.read() != b.read():
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} was trained with another tokenizer than "
                              f"data.dir={cfg.data.dir!r} ({theirs} differs from {ours}); train on data prepared with "
                              "the same tokenizer")


def check_same_mask_token(cfg: TrainConfig, bundle, manifest: dict) -> None:
    """The data's [MASK] (its spelling and id in the manifest) is the one the model's tokenizer has."""
    spelling, want = (manifest.get("tokenizer") or {}).get("mask_token"), manifest.get("mask_token_id")
    if cfg.model.arch.get("mask_token_id") is not None or bundle.tokenizer is None or spelling is None:
        return
    got = bundle.tokenizer.token_to_id(spelling)
    if got is not None and got != int(want):
        added = (manifest.get("tokenizer") or {}).get("added_special_tokens") or []
        raise ConfigError(f"data.dir={cfg.data.dir!r} has [MASK] {spelling}={want} but model.init_from="
                          f"{cfg.model.init_from!r} gives {spelling} id {got}: the data was tokenized with another "
                          f"tokenizer (its preparation added {added}); prepare it with the model's (data.tokenizer: "
                          "the same path as model.init_from)")


def _checkpoint_tokenizer(path: str, kind: str, name: str) -> str | None:
    if kind == "run":
        from tidar_jax.checkpoint.run import run_and_steps

        path = run_and_steps(path)[0]
    file = os.path.join(path, name)
    return file if os.path.isfile(file) else None


def load_init(cfg: TrainConfig, manifest: dict, mesh, data_dir: str | None = None):
    """``(ModelConfig, pure params)`` from ``model.init_from`` (HF dir or params checkpoint), sharded on ``mesh``.

    The YAML's TiDAR fields, dtypes and attention kernel override the checkpoint's; the [MASK] id is the YAML's,
    else the data manifest's, else the checkpoint's; a TiDAR run from a checkpoint that records no block size (a
    plain HF model) drafts ``DEFAULT_BLOCK_SIZE`` (16, the paper's) unless the YAML gives one."""
    from flax import nnx

    from tidar_jax.data.tokenizer import MASK_TOKEN as ADDED_MASK_TOKEN
    from tidar_jax.loading import checkpoint_kind, load_for_inference
    from tidar_jax.config import DEFAULT_BLOCK_SIZE
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.train.step import param_shardings

    source = cfg.model.init_from
    try:
        kind = checkpoint_kind(source)  # one clear error for a path that is no checkpoint
        # a stock HF model without [MASK]: the same <|mask|> the data preparation appended to its tokenizer
        # (embedding and an untied head grow by one mean row, tidar_jax.hf.load); checked against the data below
        spelling = (manifest.get("tokenizer") or {}).get("mask_token")
        hf_kwargs = {"add_mask_token": True} if kind == "hf" and spelling == ADDED_MASK_TOKEN else {}
        with warnings.catch_warnings():  # a damaged newest step falls back to an older one; none left: one line
            warnings.simplefilter("ignore", ck.CheckpointFallbackWarning)
            bundle = load_for_inference(source, mesh=mesh, **hf_kwargs)  # straight into the target shardings
    except Exception as e:  # a damaged checkpoint raises whatever its reader does: one line naming the path
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.init_from={source!r} cannot be loaded: {reason}") from None
    check_same_tokenizer(cfg, kind, data_dir)
    check_same_mask_token(cfg, bundle, manifest)
    keep = ("block_size", "mask_token_id", "dtype", "param_dtype", "attention")
    over = {k: v for k, v in cfg.model.arch.items() if k in keep and v is not None}
    # a preset may spell out the architecture (for train.py --plan); it must be the checkpoint's
    differ = {k: (v, getattr(bundle.config, k)) for k, v in cfg.model.arch.items()
              if k not in over and k != "mask_token_id" and v is not None and getattr(bundle.config, k) != v}
    if differ:
        k, (want, got) = sorted(differ.items())[0]
        raise ConfigError(f"model.{k}={want!r} in the config but model.init_from={cfg.model.init_from!r} has "
                          f"{k}={got!r}; remove the key or make it match the checkpoint")
    recorded = manifest.get("mask_token_id")
    over["mask_token_id"] = resolve_mask_token(over.get("mask_token_id"),
                                               bundle.config.mask_token_id if recorded is None else recorded,
                                               vocab_size=bundle.config.vocab_size)
    block_size = over.get("block_size", bundle.config.block_size)
    if block_size is None and cfg.train.objective == "tidar":
        block_size = DEFAULT_BLOCK_SIZE
    over["block_size"] = cfg.trained_block_size(block_size)
    mcfg = bundle.config.replace(**over)
    if mcfg.vocab_size < int(manifest["vocab_size"]):
        raise ConfigError(f"model.init_from={cfg.model.init_from!r} has vocab {mcfg.vocab_size}, smaller than the "
                          f"data tokenizer's {manifest['vocab_size']}; tokenize the data with the model's tokenizer")
    params = nnx.to_pure_dict(bundle.params)
    _, abstract = abstract_model(mcfg)
    # the checkpoint may store another param dtype (e.g. bf16 HF weights) than this run trains in
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, nnx.to_pure_dict(abstract))
    return mcfg, jax.device_put(params, param_shardings(abstract, mesh))


def init_serving_record(source: str) -> dict | None:
    """What a server reads beside the weights (chat template, generation settings, EOS ids, context length), as
    ``model.init_from`` carries it: the run keeps it, so that the export of the trained run writes it."""
    from tidar_jax.loading import serving_record

    try:
        return serving_record(source)
    except Exception as e:  # a bad chat template or generation config: one line naming the path
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.init_from={source!r}: {reason}") from None


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything ``setup`` prepared; ``state`` and ``tokens_seen`` advance as the loop runs."""

    cfg: TrainConfig
    run_dir: str
    main: bool  # process 0: writes the run files, logs, evaluates the unigram bar and runs the decode probe
    show: bool
    data_dir: str
    manifest: dict
    mesh: Any
    mesh_shape: tuple
    mcfg: ModelConfig
    graphdef: Any
    fns: Any
    data_iter: Any
    ckpts: ck.RunCheckpoints
    state: Any
    start: int
    resumed: bool
    tokens_seen: int
    evals: list
    unigram: float | None
    writer: Any
    t_start: float

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.global_batch * self.cfg.data.seq_len


def check_mesh(cfg: TrainConfig, mesh_shape) -> None:
    """The batch splits evenly over the data-parallel devices, the gradient accumulation and the processes."""
    dp = mesh_shape[0] * mesh_shape[1]
    if cfg.data.global_batch % (dp * cfg.optim.grad_accum):
        raise ConfigError(f"data.global_batch={cfg.data.global_batch}: must be divisible by mesh data*fsdp={dp} "
                          f"times optim.grad_accum={cfg.optim.grad_accum}")
    if cfg.data.eval_batches and cfg.data.eval_batch_size % dp:
        raise ConfigError(f"data.eval_batch_size={cfg.data.eval_batch_size}: must be divisible by mesh "
                          f"data*fsdp={dp}")
    if cfg.data.global_batch % jax.process_count():
        raise ConfigError(f"data.global_batch={cfg.data.global_batch}: must be divisible by the process count "
                          f"{jax.process_count()}")


def setup(cfg: TrainConfig, run_dir: str, show_progress: bool = True) -> Run:
    """Every check once (output location, data, mesh, model, block alignment), then the model, the step, the run
    files, the iterators and the state (restored from the newest checkpoint, or initialised). A run dir that did
    not exist before is removed again when anything here fails, so a bad config or bad data leaves nothing."""
    from tidar_jax.output_paths import check_output_dir

    initialize(cfg.distributed)
    t_start = time.perf_counter()
    run_dir = check_output_dir(run_dir, existing=ck.run_dir_problem)
    created = not os.path.exists(run_dir)
    try:
        return _setup(cfg, run_dir, show_progress, t_start)
    except BaseException:
        if created and jax.process_index() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _setup(cfg: TrainConfig, run_dir: str, show_progress: bool, t_start: float) -> Run:
    from flax import nnx

    from tidar_jax.data import eval_examples, make_train_iterator
    from tidar_jax.model.functional import abstract_model, create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.step import abstract_train_state, init_train_state, make_step_fns
    from tidar_jax.train.tensorboard import ScalarWriter

    main = jax.process_index() == 0
    show = show_progress and main
    cfg = resolve_pretrained(cfg, show)
    packing_mode = resolve_packing(cfg, run_dir)
    if cfg.data.packing is None and packing_mode == "windows":
        cfg = cfg.replace(**{"data.packing": "windows"})  # an old run dir: recorded in its config.yaml from now on
    if cfg.data.sources:  # a mixture: the first source supplies the tokenizer and the eval split
        data_dir, manifest = prepare_data(cfg.replace(**{"data.dir": cfg.data.sources[0]["dir"],
                                                         "data.prepare": False}))
    else:
        data_dir, manifest = prepare_data(cfg)

    mesh_shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    check_mesh(cfg, mesh_shape)
    mesh = make_mesh(*mesh_shape)
    init_params, serving = None, None
    if cfg.model.init_from:
        mcfg, init_params = load_init(cfg, manifest, mesh, data_dir)
        serving = init_serving_record(cfg.model.init_from)
    else:
        mcfg = build_model_config(cfg, manifest)
    check_block_alignment(cfg, mcfg.block_size)

    graphdef, abstract = abstract_model(mcfg, remat=cfg.model.remat)
    fns = make_step_fns(graphdef, mcfg, abstract, mesh, cfg.optim, cfg.train.steps, cfg.train.objective,
                        cfg.train.alpha, DraftLoss.from_train(cfg.train), cfg.train.loss_chunk, cfg.mesh.strict,
                        (cfg.data.global_batch, cfg.data.seq_len))

    os.makedirs(run_dir, exist_ok=True)
    if main:  # run-dir files next to the checkpoints (the resolved config is also in every checkpoint's meta)
        ck.write_run_files(
            run_dir, CheckpointMeta(mcfg, eos_token_ids=eos_tuple(manifest.get("eos_token_id")), hf=serving),
            dump_yaml(cfg),
            {k: manifest.get(k) for k in ("fingerprint", "vocab_size", "eos_token_id", "mask_token_id", "dtype",
                                          "splits")} | {"data_dir": data_dir},
            os.path.join(data_dir, "tokenizer.json"))

    # documents start on block boundaries, so a TiDAR mask block never holds two documents
    packing = {"packing": packing_mode, "block_size": mcfg.block_size or 1}
    selfgen_dir = None
    if cfg.data.selfgen_rows:  # made once by process 0 before any process reads it
        from tidar_jax.train.selfgen import SELFGEN_DIR, build_selfgen

        selfgen_dir = os.path.join(run_dir, SELFGEN_DIR)
        if main:
            build_selfgen(cfg.model.init_from, data_dir, selfgen_dir, cfg.data.selfgen_rows,
                          cfg.data.selfgen_prompt_tokens, cfg.data.seq_len, mcfg.block_size, cfg.train.seed,
                          log=(lambda m: print(m, flush=True)) if show else (lambda m: None))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("selfgen")
    data_iter = make_train_iterator(data_sources(cfg, data_dir, selfgen_dir), cfg.data.seq_len, cfg.data.global_batch,
                                    cfg.train.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), prefetch=cfg.data.prefetch,
                                    worker_count=cfg.data.worker_count, **packing)
    ckpts = ck.RunCheckpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    restored = ckpts.restore_latest(abstract_train_state(fns.tx, fns.template, fns.state_shardings), data_iter)
    if restored is not None:
        start, state, meta = restored
        tokens_seen = int(meta.get("tokens_seen", 0))
        if show:
            print(f"resuming {run_dir} from step {start}", flush=True)
    else:
        start, tokens_seen = 0, 0
        if init_params is None:
            _, params = create_sharded(mcfg, mesh, seed=cfg.train.seed, remat=cfg.model.remat)
            init_params = nnx.to_pure_dict(params)
        state = init_train_state(fns.tx, init_params, fns.state_shardings)
        del init_params

    evals = eval_examples(data_dir, cfg.data.seq_len, cfg.data.eval_batch_size, cfg.data.eval_batches,
                          **packing) if cfg.data.eval_batches else []
    unigram = unigram_cross_entropy(data_dir, manifest) if main else None
    writer = ScalarWriter(os.path.join(run_dir, "tb"), enabled=main and cfg.logging.tensorboard)
    if show:
        print(f"model {mcfg.num_params / 1e6:.2f}M params ({mcfg.family}, d={mcfg.hidden_size}, "
              f"L={mcfg.num_layers}, V={mcfg.vocab_size}, B={mcfg.block_size}); mesh (data,fsdp,tensor)={mesh_shape} "
              f"on {jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
              f"objective={cfg.train.objective}; steps {start}->{cfg.train.steps}; batch {cfg.data.global_batch}x"
              f"{cfg.data.seq_len}", flush=True)
    return Run(cfg, run_dir, main, show, data_dir, manifest, mesh, mesh_shape, mcfg, graphdef, fns, data_iter, ckpts,
               state, start, restored is not None, tokens_seen, evals, unigram, writer, t_start)


# ----------------------------------------------------------------------------------------------------------------
# The loop and its hooks
# ----------------------------------------------------------------------------------------------------------------

class Evaluation:
    """Held-out metrics every ``logging.eval_every`` steps (and once at the end)."""

    def __init__(self, run: Run, progress: _Progress):
        self.run, self.progress = run, progress
        self.last: dict = {}

    def evaluate(self, step: int) -> dict:
        run = self.run
        if not run.evals:
            return {}
        sums: dict[str, float] = {}
        for batch in run.evals:
            arrs = [jax.make_array_from_callback(b.shape, run.fns.batch_sharding, lambda idx, b=b: b[idx])
                    for b in (batch["tokens"], batch.get("segment_ids")) if b is not None]
            for k, v in jax.device_get(run.fns.eval_step(run.state["params"], *arrs)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {k: v / len(run.evals) for k, v in sums.items()}
        run.writer.write(step, {f"eval/{k}": v for k, v in out.items()}
                         | ({"eval/unigram_entropy": run.unigram} if run.unigram is not None else {}))
        self.last = out
        return out

    def after_step(self, step: int, metrics: dict, dt: float) -> None:
        every = self.run.cfg.logging.eval_every
        if every and step % every == 0 and step < self.run.cfg.train.steps:
            out = self.evaluate(step)
            self.progress.message(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in out.items()))


class Logging:
    """Mean train metrics and throughput over each ``logging.every`` window: TensorBoard and the progress line."""

    def __init__(self, run: Run, progress: _Progress):
        self.run, self.progress = run, progress
        self.window: dict[str, float] = {}
        self.window_steps, self.window_time = 0, 0.0
        self.last: dict = {}

    def after_step(self, step: int, metrics: dict, dt: float) -> None:
        run, total = self.run, self.run.cfg.train.steps
        self.progress.step()
        if step > run.start + 1 or run.start == total - 1:  # the first step of a process includes compilation
            self.window_time += dt
            self.window_steps += 1
        for k, v in metrics.items():
            if k != "finite":
                self.window[k] = self.window.get(k, 0.0) + float(v)
        self.window["_n"] = self.window.get("_n", 0.0) + 1
        if step % run.cfg.logging.every and step != total:
            return
        n = self.window.pop("_n")
        last = self.last = {k: v / n for k, v in self.window.items() if not k.endswith("_tokens")}
        step_time = self.window_time / self.window_steps if self.window_steps else dt
        tok_s = run.tokens_per_step / step_time
        scalars = {f"train/{k}": v for k, v in last.items()}
        scalars.update({"perf/step_time_s": step_time, "perf/tokens_per_s": tok_s,
                        "train/tokens_seen": run.tokens_seen})
        run.writer.write(step, scalars)
        line = (f"step {step}/{total} loss {last['loss']:.4f}"
                + (f" ar {last['ar_loss']:.4f}" if "ar_loss" in last else "")
                + (f" diff {last['diff_loss']:.4f}" if "diff_loss" in last else "")
                + f" lr {last['lr']:.2e} gnorm {last['grad_norm']:.3f}"
                + f" {tok_s:,.0f} tok/s {step_time * 1e3:.0f} ms/step")
        self.progress.message(line, {"loss": f"{last['loss']:.3f}", "tok/s": f"{tok_s:,.0f}"})
        self.window, self.window_steps, self.window_time = {}, 0, 0.0


class Checkpointing:
    """A checkpoint every ``checkpoint.every`` steps and of the final step."""

    def __init__(self, run: Run):
        self.run = run

    def save(self, step: int, force: bool = False) -> None:
        run = self.run
        meta = {"step": step, "tokens_seen": run.tokens_seen, "config": run.cfg.to_dict(),
                "model_config": run.mcfg.to_dict(), "mesh": list(run.mesh_shape),
                "process_count": jax.process_count()}
        run.ckpts.save(step, run.state, meta, run.data_iter, force=force)

    def after_step(self, step: int, metrics: dict, dt: float) -> None:
        if step % self.run.cfg.checkpoint.every == 0 and step < self.run.cfg.train.steps:
            self.save(step)

    def finish(self, step: int) -> None:
        if step not in self.run.ckpts.steps() and step > self.run.start:
            self.save(step, force=True)
        self.run.ckpts.wait()


class StepSleep:
    """Preemption drills and the kill -9 resume test: ``TIDAR_TRAIN_STEP_SLEEP`` seconds after every step."""

    def after_step(self, step: int, metrics: dict, dt: float) -> None:
        if _STEP_SLEEP:
            time.sleep(_STEP_SLEEP)


class Preemption:
    """SIGTERM/SIGINT between steps: checkpoint the last completed step, then raise ``Preempted``."""

    def __init__(self, checkpointing: Checkpointing, flag: _SignalFlag):
        self.checkpointing, self.flag = checkpointing, flag

    def after_step(self, step: int, metrics: dict, dt: float) -> None:
        if self.flag.signum is None:
            return
        self.checkpointing.save(step, force=True)
        ckpts = self.checkpointing.run.ckpts
        ckpts.wait()
        name = signal.Signals(self.flag.signum).name
        raise Preempted(f"{name} received: saved a checkpoint at step {step} in {ckpts.directory}; "
                        "re-run the same command to resume", self.flag.signum)


def run_loop(run: Run, hooks, checkpointing: Checkpointing) -> tuple[int, list]:
    """Steps from ``run.start`` to ``train.steps``; after each, every hook's ``after_step`` in order.
    Returns ``(final step, [(step, loss), ...])``. Raises ``TrainingDiverged`` on a non-finite loss."""
    cfg, fns = run.cfg, run.fns
    losses, step = [], run.start
    while step < cfg.train.steps:
        local = next(run.data_iter)
        t0 = time.perf_counter()
        batch = [jax.make_array_from_process_local_data(fns.batch_sharding, local[k],
                                                        (cfg.data.global_batch, cfg.data.seq_len))
                 for k in ("tokens", "segment_ids") if k in local]
        run.state, metrics = fns.train_step(run.state, *batch)
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        if not bool(metrics["finite"]):
            run.ckpts.wait()
            good = run.ckpts.steps()
            where = f"step {good[-1]} in {run.ckpts.directory}" if good else "none was written"
            raise TrainingDiverged(
                f"non-finite loss at step {step + 1} (loss={float(metrics['loss'])}, grad_norm="
                f"{float(metrics['grad_norm'])}); stopping. The update was not applied. Last good "
                f"checkpoint: {where}. Lower optim.lr or check the data.")
        step += 1
        run.tokens_seen += run.tokens_per_step
        losses.append((step, float(metrics["loss"])))
        for hook in hooks:
            hook.after_step(step, metrics, dt)
    checkpointing.finish(step)
    return step, losses


def train(cfg: TrainConfig, run_dir: str, show_progress: bool = True) -> RunResult:
    """Train (or resume) the run in ``run_dir``; returns a summary.  Raises ``TrainingDiverged`` / ``Preempted``."""
    run = setup(cfg, run_dir, show_progress)
    cfg = run.cfg
    progress = _Progress(cfg.logging.progress if cfg.logging.progress is not None else sys.stdout.isatty(),
                         run.start, cfg.train.steps, run.show)
    logging_hook, evaluation, checkpointing = Logging(run, progress), Evaluation(run, progress), Checkpointing(run)
    try:
        with _SignalFlag() as flag:
            step, losses = run_loop(run, [logging_hook, evaluation, checkpointing, StepSleep(),
                                          Preemption(checkpointing, flag)], checkpointing)
    finally:
        progress.close()
        run.writer.flush()
    last_eval = evaluation.evaluate(step)
    probe = decode_probe(cfg, run.mcfg, run.graphdef, run.fns.template, run.state["params"], run.evals,
                         run.manifest) if run.main else None
    if probe:
        run.writer.write(step, {"eval/probe_tokens_per_nfe": probe["tokens_per_nfe"]})
    run.writer.close()
    run.ckpts.close()
    return RunResult(run.run_dir, run.start, step, run.resumed, time.perf_counter() - run.t_start, logging_hook.last,
                     last_eval, run.unigram, losses, probe)


def decode_probe(cfg: TrainConfig, mcfg: ModelConfig, graphdef, template, params, evals, manifest) -> dict | None:
    """Lossless TiDAR decode of a few held-out prompts: tokens per forward (T/NFE) of drafts the AR verifier
    accepts, the drafting quality in one number."""
    n = cfg.logging.decode_probe_prompts
    if not n or not evals or cfg.train.objective != "tidar" or jax.process_count() > 1:
        return None
    from tidar_jax.decode.api import Decoder
    from tidar_jax.train.step import to_model

    prompt_len = min(32, cfg.data.seq_len)
    tokens = np.concatenate([b["tokens"] for b in evals], axis=0)[:n, :prompt_len]
    if "segment_ids" in evals[0]:  # packed: the prompt is the start of the row's first document only
        segments = np.concatenate([b["segment_ids"] for b in evals], axis=0)[:n, :prompt_len]
        rows = [row[seg == seg[0]] for row, seg in zip(tokens, segments)]
    else:
        rows = list(tokens)
    local = jax.device_put(jax.device_get(params))  # decode runs on one device
    model = to_model(graphdef, template, local)
    decoder = Decoder.from_model(model, check_block_size=True, eos_token_id=None)
    # lossless (beta=1, slot0=verifier): the output is the AR model's, so T/NFE counts only drafts the verifier
    # accepts. Forwards are counted per row, so the figure is the batch-1 one for these prompts.
    result = decoder.generate([list(map(int, r)) for r in rows], mode="tidar", beta=1.0, slot0="verifier",
                              max_new_tokens=cfg.logging.decode_probe_tokens)
    return {"tokens_per_nfe": float(result.stats["tokens_per_nfe"]), "prompts": int(len(rows)),
            "new_tokens": int(sum(result.stats["new_tokens"])), "wall_s": float(result.stats["wall_s"]),
            "block_size": int(mcfg.block_size), "mode": "lossless",
            "accepted_length_hist": dict(result.stats["accepted_length_hist"])}
