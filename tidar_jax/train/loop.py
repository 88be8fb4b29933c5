"""The training loop: data -> sharded step -> logs/eval/checkpoints, with automatic resume from the run dir.

Resume is exact: the batch order is a pure function of (data, seed, step) and the grain iterator state is saved
with every checkpoint, the train step has no randomness, and params/optimizer state are restored bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

import jax
import numpy as np

from tidar_jax.config import ConfigError, ModelConfig
from tidar_jax.draft_loss import DraftLoss
from tidar_jax.train import checkpointing as ck
from tidar_jax.train.config import TrainConfig, dump_yaml
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

def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        if not cfg.data.prepare:
            raise ConfigError(f"data.dir={cfg.data.dir!r} holds no prepared corpus and data.prepare=false; run "
                              "`python -m tidar_jax.data.prepare --out DIR` or set data.prepare=true")
        print(f"preparing the corpus in {data_dir} (once; later runs reuse it) ...", flush=True)
        prepare_corpus(data_dir, vocab_size=cfg.data.vocab_size, heldout_fraction=cfg.data.heldout_fraction,
                       seed=0, max_files=cfg.data.max_files, max_bytes=cfg.data.max_bytes)
    return data_dir, load_manifest(data_dir)


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


def data_sources(cfg: TrainConfig, data_dir: str):
    """The train iterator's ``data_dir`` argument: the dir, or ``[(dir, weight), ...]`` for a mixture."""
    if not cfg.data.sources:
        return data_dir
    from tidar_jax.data.pipeline import mixture_manifests, normalize_sources

    sources = normalize_sources([{"dir": os.path.abspath(x["dir"]), "weight": x.get("weight", 1.0)}
                                 for x in cfg.data.sources])
    mixture_manifests(sources)  # one clear error if the tokenizers differ
    return sources


def _arch_overrides(cfg: TrainConfig, manifest: dict) -> dict:
    keep = ("block_size", "mask_token_id", "dtype", "param_dtype", "attention")
    over = {k: v for k, v in cfg.model.arch.items() if k in keep and v is not None}
    if "mask_token_id" not in over and manifest.get("mask_token_id") is not None:
        over["mask_token_id"] = int(manifest["mask_token_id"])
    return over


def build_model_config(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    """Architecture of a from-scratch run (checked against the tokenizer of the data)."""
    mcfg = cfg.model_config(mask_token_id=manifest.get("mask_token_id"))
    if mcfg.vocab_size < int(manifest["vocab_size"]):
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size}: smaller than the data tokenizer's vocabulary "
                          f"({manifest['vocab_size']}); set model.vocab_size >= {manifest['vocab_size']}")
    return mcfg


def load_init(cfg: TrainConfig, manifest: dict, mesh):
    """``(ModelConfig, pure params)`` from ``model.init_from`` (HF dir or params checkpoint), sharded on ``mesh``."""
    from flax import nnx

    from tidar_jax.loading import checkpoint_kind, load_for_inference
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.train.step import param_shardings

    checkpoint_kind(cfg.model.init_from)  # one clear error for a path that is no checkpoint
    bundle = load_for_inference(cfg.model.init_from, mesh=mesh)  # loads straight into the target shardings
    over = _arch_overrides(cfg, manifest)
    # a preset may spell out the architecture (for train.py --plan); it must be the checkpoint's
    differ = {k: (v, getattr(bundle.config, k)) for k, v in cfg.model.arch.items()
              if k not in over and v is not None and getattr(bundle.config, k) != v}
    if differ:
        k, (want, got) = sorted(differ.items())[0]
        raise ConfigError(f"model.{k}={want!r} in the config but model.init_from={cfg.model.init_from!r} has "
                          f"{k}={got!r}; remove the key or make it match the checkpoint")
    mcfg = bundle.config.replace(**over)
    if mcfg.vocab_size < int(manifest["vocab_size"]):
        raise ConfigError(f"model.init_from={cfg.model.init_from!r} has vocab {mcfg.vocab_size}, smaller than the "
                          f"data tokenizer's {manifest['vocab_size']}; tokenize the data with the model's tokenizer")
    params = nnx.to_pure_dict(bundle.params)
    _, abstract = abstract_model(mcfg)
    # the checkpoint may store another param dtype (e.g. bf16 HF weights) than this run trains in
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, nnx.to_pure_dict(abstract))
    return mcfg, jax.device_put(params, param_shardings(abstract, mesh))


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str, show_progress: bool = True) -> RunResult:
    """Train (or resume) the run in ``run_dir``; returns a summary.  Raises ``TrainingDiverged`` / ``Preempted``."""
    initialize(cfg.distributed)
    from flax import nnx

    from tidar_jax.data import eval_examples, make_train_iterator
    from tidar_jax.model.functional import abstract_model, create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.step import abstract_train_state, init_train_state, make_step_fns
    from tidar_jax.train.tensorboard import ScalarWriter

    t_start = time.perf_counter()
    run_dir = os.path.abspath(run_dir)
    main = jax.process_index() == 0
    show = show_progress and main
    os.makedirs(run_dir, exist_ok=True)
    packing_mode = resolve_packing(cfg, run_dir)
    if cfg.data.packing is None and packing_mode == "windows":
        cfg = cfg.replace(**{"data.packing": "windows"})  # an old run dir: recorded in its config.yaml from now on
    if cfg.data.sources:  # a mixture: the first source supplies the tokenizer and the eval split
        data_dir, manifest = prepare_data(cfg.replace(**{"data.dir": cfg.data.sources[0]["dir"],
                                                         "data.prepare": False}))
    else:
        data_dir, manifest = prepare_data(cfg)

    mesh_shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    mesh = make_mesh(*mesh_shape)
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

    init_params = None
    if cfg.model.init_from:
        mcfg, init_params = load_init(cfg, manifest, mesh)
    else:
        mcfg = build_model_config(cfg, manifest)
    if cfg.train.objective == "tidar" and cfg.data.seq_len % mcfg.block_size:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: must be a multiple of model.block_size="
                          f"{mcfg.block_size}")

    graphdef, abstract = abstract_model(mcfg, remat=cfg.model.remat)
    total = cfg.train.steps
    if cfg.train.objective == "tidar" and cfg.train.loss_chunk % mcfg.block_size:
        raise ConfigError(f"train.loss_chunk={cfg.train.loss_chunk}: must be a multiple of model.block_size="
                          f"{mcfg.block_size} (chunks align to blocks)")
    fns = make_step_fns(graphdef, mcfg, abstract, mesh, cfg.optim, total, cfg.train.objective, cfg.train.alpha,
                        DraftLoss.from_train(cfg.train), cfg.train.loss_chunk, cfg.mesh.strict,
                        (cfg.data.global_batch, cfg.data.seq_len))

    if main:  # run-dir files next to the checkpoints (the resolved config is also in every checkpoint's meta)
        _write_atomic(os.path.join(run_dir, ck.RUN_CONFIG), dump_yaml(cfg))
        _write_atomic(os.path.join(run_dir, ck.MODEL_CONFIG), json.dumps(mcfg.to_dict(), indent=2))
        _write_atomic(os.path.join(run_dir, ck.DATA_MANIFEST), json.dumps(
            {k: manifest.get(k) for k in ("fingerprint", "vocab_size", "eos_token_id", "mask_token_id", "dtype",
                                          "splits")} | {"data_dir": data_dir}, indent=2))
        tok_src = os.path.join(data_dir, "tokenizer.json")
        if os.path.isfile(tok_src):
            shutil.copyfile(tok_src, os.path.join(run_dir, ck.TOKENIZER))

    # documents start on block boundaries, so a TiDAR mask block never holds two documents
    packing = {"packing": packing_mode,
               "block_size": mcfg.block_size if cfg.train.objective == "tidar" else 1}
    data_iter = make_train_iterator(data_sources(cfg, data_dir), cfg.data.seq_len, cfg.data.global_batch,
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
    resumed = restored is not None

    evals = eval_examples(data_dir, cfg.data.seq_len, cfg.data.eval_batch_size, cfg.data.eval_batches,
                          **packing) if cfg.data.eval_batches else []
    unigram = unigram_cross_entropy(data_dir, manifest) if main else None
    writer = ScalarWriter(os.path.join(run_dir, "tb"), enabled=main and cfg.logging.tensorboard)
    if main and show:
        print(f"model {mcfg.num_params / 1e6:.2f}M params ({mcfg.family}, d={mcfg.hidden_size}, "
              f"L={mcfg.num_layers}, V={mcfg.vocab_size}, B={mcfg.block_size}); mesh (data,fsdp,tensor)={mesh_shape} "
              f"on {jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
              f"objective={cfg.train.objective}; steps {start}->{total}; batch {cfg.data.global_batch}x"
              f"{cfg.data.seq_len}", flush=True)

    def run_eval(step: int) -> dict:
        if not evals:
            return {}
        sums: dict[str, float] = {}
        for batch in evals:
            arrs = [jax.make_array_from_callback(b.shape, fns.batch_sharding, lambda idx, b=b: b[idx])
                    for b in (batch["tokens"], batch.get("segment_ids")) if b is not None]
            for k, v in jax.device_get(fns.eval_step(state["params"], *arrs)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {k: v / len(evals) for k, v in sums.items()}
        writer.write(step, {f"eval/{k}": v for k, v in out.items()}
                     | ({"eval/unigram_entropy": unigram} if unigram is not None else {}))
        return out

    def save(step: int, force: bool = False):
        meta = {"step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict(), "model_config": mcfg.to_dict(),
                "mesh": list(mesh_shape), "process_count": jax.process_count()}
        ckpts.save(step, state, meta, data_iter, force=force)

    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    progress = _Progress(cfg.logging.progress if cfg.logging.progress is not None else sys.stdout.isatty(),
                         start, total, show)
    window: dict[str, float] = {}
    window_steps, window_time = 0, 0.0
    last_train, last_eval, losses = {}, {}, []
    step = start
    try:
        with _SignalFlag() as stop:
            while step < total:
                local = next(data_iter)
                t0 = time.perf_counter()
                batch = [jax.make_array_from_process_local_data(fns.batch_sharding, local[k],
                                                                (cfg.data.global_batch, cfg.data.seq_len))
                         for k in ("tokens", "segment_ids") if k in local]
                state, metrics = fns.train_step(state, *batch)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                if not bool(metrics["finite"]):
                    ckpts.wait()
                    good = ckpts.steps()
                    where = f"step {good[-1]} in {ckpts.directory}" if good else "none was written"
                    raise TrainingDiverged(
                        f"non-finite loss at step {step + 1} (loss={float(metrics['loss'])}, grad_norm="
                        f"{float(metrics['grad_norm'])}); stopping. The update was not applied. Last good "
                        f"checkpoint: {where}. Lower optim.lr or check the data.")
                step += 1
                tokens_seen += tokens_per_step
                losses.append((step, float(metrics["loss"])))
                progress.step()
                if step > start + 1 or start == total - 1:  # the first step of a process includes compilation
                    window_time += dt
                    window_steps += 1
                for k, v in metrics.items():
                    if k != "finite":
                        window[k] = window.get(k, 0.0) + float(v)
                window["_n"] = window.get("_n", 0.0) + 1
                if step % cfg.logging.every == 0 or step == total:
                    n = window.pop("_n")
                    last_train = {k: v / n for k, v in window.items() if not k.endswith("_tokens")}
                    step_time = window_time / window_steps if window_steps else dt
                    scalars = {f"train/{k}": v for k, v in last_train.items()}
                    scalars.update({"perf/step_time_s": step_time, "perf/tokens_per_s": tokens_per_step / step_time,
                                    "train/tokens_seen": tokens_seen})
                    writer.write(step, scalars)
                    line = (f"step {step}/{total} loss {last_train['loss']:.4f}"
                            + (f" ar {last_train['ar_loss']:.4f}" if "ar_loss" in last_train else "")
                            + (f" diff {last_train['diff_loss']:.4f}" if "diff_loss" in last_train else "")
                            + f" lr {last_train['lr']:.2e} gnorm {last_train['grad_norm']:.3f}"
                            + f" {tokens_per_step / step_time:,.0f} tok/s {step_time * 1e3:.0f} ms/step")
                    progress.message(line, {"loss": f"{last_train['loss']:.3f}",
                                            "tok/s": f"{tokens_per_step / step_time:,.0f}"})
                    window, window_steps, window_time = {}, 0, 0.0
                if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < total:
                    last_eval = run_eval(step)
                    progress.message(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                if step % cfg.checkpoint.every == 0 and step < total:
                    save(step)
                if _STEP_SLEEP:
                    time.sleep(_STEP_SLEEP)
                if stop.signum is not None:
                    save(step, force=True)
                    ckpts.wait()
                    name = signal.Signals(stop.signum).name
                    raise Preempted(f"{name} received: saved a checkpoint at step {step} in {ckpts.directory}; "
                                    "re-run the same command to resume", stop.signum)
            if step not in ckpts.steps() and step > start:
                save(step, force=True)
            ckpts.wait()
    finally:
        progress.close()
        writer.flush()
    last_eval = run_eval(step)
    probe = decode_probe(cfg, mcfg, graphdef, fns.template, state["params"], evals, manifest) if main else None
    if probe:
        writer.write(step, {"eval/probe_tokens_per_nfe": probe["tokens_per_nfe"]})
    writer.close()
    ckpts.close()
    return RunResult(run_dir, start, step, resumed, time.perf_counter() - t_start, last_train, last_eval, unigram,
                     losses, probe)


def decode_probe(cfg: TrainConfig, mcfg: ModelConfig, graphdef, template, params, evals, manifest) -> dict | None:
    """TiDAR decode on a few held-out prompts: tokens per forward (T/NFE), the drafting quality in one number."""
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
    decoder = Decoder.from_model(model, trained_block_size=mcfg.block_size, eos_token_id=None)
    result = decoder.generate([list(map(int, r)) for r in rows], mode="tidar",
                              max_new_tokens=cfg.logging.decode_probe_tokens)
    return {"tokens_per_nfe": float(result.stats["tokens_per_nfe"]), "prompts": int(len(rows)),
            "new_tokens": int(sum(result.stats["new_tokens"])), "wall_s": float(result.stats["wall_s"])}
