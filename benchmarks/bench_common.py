"""Shared plumbing for the benchmark scripts: the machine description, interleaved timing, the model under test
(a checkpoint, or a random-init preset that is loudly labelled as such), held-out prompts and result files.

Every benchmark times its candidates *interleaved* (round-robin after a warm-up) so that a busy or drifting machine
affects all candidates alike; ratios are only ever taken between numbers from the same run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import ROOT
from benchmarks.cli import fail
from benchmarks.presets import PRESETS
from tidar_jax.checkpoint import InferenceBundle
from tidar_jax.config import ModelConfig


RANDOM_MODEL_WARNING = (
    "WARNING: no checkpoint given -- this is a RANDOM-INIT model. Its diffusion drafts are noise, so it accepts "
    "about 1 token per step: acceptance, T/NFE and any speedup or block-size recommendation below say nothing "
    "about a trained TiDAR model. Pass --checkpoint RUN_DIR for real numbers.")


class BenchError(ValueError):
    """Bad benchmark input; the message names the value and what is allowed."""


# ------------------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs), or None where it cannot be read."""
    best = None
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for name in os.listdir(root):
            try:
                with open(os.path.join(root, name, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            value = int(text.rstrip("KMG")) * scale
            best = value if best is None else max(best, value)
    except (OSError, ValueError):
        return best
    return best


def cpu_threads() -> int:
    """CPUs this process may run on (what XLA's CPU thread pool is sized to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import flax

    versions = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                "numpy": np.__version__}
    for name in ("torch", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = mod.__version__
    devices = jax.devices()
    return {
        "cpu_model": _cpu_model(),
        "cpu_threads": cpu_threads(),
        "memory_gib": _mem_total_gib(),
        "last_level_cache_mib": (lambda c: round(c / 2 ** 20, 1) if c else None)(last_level_cache_bytes()),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "versions": versions,
        "load_average_1_5_15": load_average(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------------------------------------------
# Interleaved timing
# ------------------------------------------------------------------------------------------------------------

def _block(x):
    return jax.block_until_ready(x)


class DonatedStepper:
    """A zero-argument candidate that calls a decode step compiled with its state donated and feeds the new state
    back, as the decode loop does (a non-donated call would copy the whole allocated cache for the K/V write and
    time that instead)."""

    def __init__(self, step_fn, params, state):
        self.step_fn, self.params, self.state = step_fn, params, state

    def __call__(self):
        self.state = self.step_fn(self.params, self.state)
        return self.state.n_out_N


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
                sync: Callable[[Any], Any] = _block, stop: Callable[[], bool] | None = None) -> dict[str, list[float]]:
    """Seconds per call for each candidate, measured round-robin: every round calls each candidate once (in a
    rotated order so no candidate is always first). ``warmup`` untimed rounds run first (compilation, caches).
    ``stop`` (e.g. a deadline) is asked before every round after the first, so at least one round is timed."""
    if rounds < 1:
        raise BenchError(f"rounds={rounds}: must be >= 1")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            sync(candidates[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r and stop is not None and stop():
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            sync(candidates[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def query_grid(max_query: int) -> list[int]:
    """Query-token counts 1, 2, 4, ... up to ``max_query`` (the free-token-slot curve's x axis)."""
    out, q = [], 1
    while q <= max_query:
        out.append(q)
        q *= 2
    return out


def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, np.float64)
    return {"min": float(a.min()), "p25": float(np.percentile(a, 25)), "median": float(np.median(a)),
            "n": int(a.size)}


# ------------------------------------------------------------------------------------------------------------
# The model under test
# ------------------------------------------------------------------------------------------------------------

def random_bundle(preset: str, seed: int = 0, **overrides) -> InferenceBundle:
    if preset not in PRESETS:
        raise BenchError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}")
    from tidar_jax.model import init_model
    from tidar_jax.model.functional import abstract_model, split

    cfg = ModelConfig(**{**PRESETS[preset], **overrides})
    graphdef, _ = abstract_model(cfg)
    params = jax.jit(lambda: split(init_model(cfg, seed))[1])()  # one compile instead of one per eager op
    return InferenceBundle(config=cfg, graphdef=graphdef, params=params, tokenizer=None,
                           eos_token_id=None, source=f"random-init preset {preset!r} (seed {seed})")


def load_model(checkpoint: str | None, preset: str, seed: int = 0) -> tuple[InferenceBundle, bool]:
    """``(bundle, trained)``: the checkpoint when given, else a random-init preset (``trained`` False)."""
    if checkpoint:
        from tidar_jax.loading import CheckpointNotFound, load_for_inference
        try:
            return load_for_inference(checkpoint), True
        except (CheckpointNotFound, FileNotFoundError) as e:
            fail(str(e))
    print(RANDOM_MODEL_WARNING, file=sys.stderr, flush=True)
    return random_bundle(preset, seed), False


def model_description(bundle: InferenceBundle, trained: bool) -> dict[str, Any]:
    cfg = bundle.config
    param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bundle.params)))
    return {"source": bundle.source, "trained": trained, "trained_block_size": cfg.block_size if trained else None,
            "step": bundle.step, "num_params": int(sum(x.size for x in jax.tree.leaves(bundle.params))),
            "param_bytes": param_bytes, "config": cfg.to_dict()}


def find_data_dir(checkpoint: str | None, data: str | None) -> str | None:
    """The held-out data: ``--data``, else the data dir a training run recorded, else ``data/stdlib`` if there."""
    if data:
        if not os.path.isfile(os.path.join(data, "manifest.json")):
            fail(f"--data {data}: no manifest.json there (prepare it with python -m tidar_jax.data.prepare)")
        return data
    if checkpoint:
        for parent in (checkpoint, os.path.dirname(os.path.normpath(checkpoint)),
                       os.path.dirname(os.path.dirname(os.path.normpath(checkpoint)))):
            path = os.path.join(parent, "config.yaml")
            if os.path.isfile(path):
                import yaml
                with open(path) as f:
                    recorded = (yaml.safe_load(f) or {}).get("data", {}).get("dir")
                if recorded:
                    for cand in (recorded, os.path.join(ROOT, recorded)):
                        if os.path.isfile(os.path.join(cand, "manifest.json")):
                            return cand
    default = os.path.join(ROOT, "data", "stdlib")
    return default if os.path.isfile(os.path.join(default, "manifest.json")) else None


def heldout_prompts(cfg: ModelConfig, data_dir: str | None, count: int, length: int, seed: int = 0
                    ) -> tuple[list[list[int]], str]:
    """``count`` prompts of ``length`` tokens: consecutive held-out windows of ``data_dir`` when its vocabulary
    fits the model, else uniformly random ids (never the mask token). Returns ``(prompts, where_from)``."""
    if data_dir is not None:
        from tidar_jax.data import eval_batches, load_manifest
        manifest = load_manifest(data_dir)
        if manifest["vocab_size"] <= cfg.vocab_size:
            try:
                rows = eval_batches(data_dir, length, count, max_batches=1)[0]
                return [r.tolist() for r in rows], f"held-out windows of {data_dir}"
            except ValueError:
                pass
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(count, length))
    ids = np.where(ids == cfg.mask_token_id, (ids + 1) % cfg.vocab_size, ids)
    return ids.tolist(), "uniformly random token ids (no matching held-out data)"


# ------------------------------------------------------------------------------------------------------------
# Result files (written atomically: temp file beside the target, then rename)
# ------------------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "w"):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, value) -> str:
    return _atomic_write(path, lambda f: (json.dump(value, f, indent=2, default=_jsonable), f.write("\n")))


def write_text(path: str, text: str) -> str:
    return _atomic_write(path, lambda f: f.write(text))


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        raise BenchError(f"{path}: no rows to write")

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    return _atomic_write(path, write)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
