"""Shared plumbing for the benchmarks: the machine description, interleaved timing, the model under test (a
checkpoint, or a random-init preset that is loudly labelled as such), held-out prompts, result files, random
inputs of a forward over a cache, and the accelerator suite's sizes, budget and figures (pure functions, checked by
tests/test_accelerator.py) with the cost model's estimate of a compiled program (recorded beside every measurement).

Every benchmark times its candidates *interleaved* (round-robin after a warm-up) so that a busy or drifting machine
affects all candidates alike; ratios are only ever taken between numbers from the same run.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ROOT
from benchmarks.cli import fail
from benchmarks.presets import PRESETS
from tidar_jax import masks
from tidar_jax.checkpoint import atomic
from tidar_jax.checkpoint import InferenceBundle
from tidar_jax.config import ModelConfig
from tidar_jax.model import KVCache
from tidar_jax.presets import MODEL_SHAPES, PAPER_DECODE
from tidar_jax.train.flops import model_flops  # noqa: F401 (the suite's sections use it)


class BenchError(ValueError):
    """Bad benchmark input; the message names the value and what is allowed."""


RANDOM_MODEL_WARNING = (
    "WARNING: no checkpoint given -- this is a RANDOM-INIT model. Its diffusion drafts are noise, so it accepts "
    "about 1 token per step: acceptance, T/NFE and any speedup or block-size recommendation below say nothing "
    "about a trained TiDAR model. Pass --checkpoint RUN_DIR for real numbers.")


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

def write_json(path: str, value) -> str:
    return atomic.write_json(path, value, default=_jsonable)


def write_text(path: str, text: str) -> str:
    return atomic.write_text(path, text)


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        raise BenchError(f"{path}: no rows to write")

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    return atomic.write_file(path, write)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---- the accelerator suite's sizes, budget and figures ----

SCHEMA_VERSION = 1
from benchmarks.accelerator.options import SECTIONS  # noqa: F401 (the suite re-exports it)
# share of the budget still unspent that a section may use (divided by the shares of it and the sections after it)
SHARES = {"trained_speedup": 0.36, "free_slots": 0.20, "roofline": 0.06, "train_throughput": 0.12,
          "attention_kernels": 0.08, "decode_step": 0.14, "calibration": 0.04, "cpu_train_step": 0.2,
          "cpu_free_slots": 0.2, "cpu_decode_modes": 0.2, "cpu_vs_transformers": 0.2, "cpu_decode_speed": 0.2}
RESERVE_S = 10.0  # kept back for the final JSON, markdown and plots

# Real shapes (config.json of each base model; owned by tidar_jax.presets). The models are random-init: timing does
# not depend on the weights.
QWEN_SHAPES: dict[str, dict[str, Any]] = {name: MODEL_SHAPES[name] for name in ("qwen2.5-0.5b", "qwen2.5-1.5b",
                                                                                 "qwen3-8b")}
# --smoke stand-ins: same families (bias / qk-norm / untied head), tiny widths, so nothing Qwen-sized is compiled
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    name: {**shape, "vocab_size": 256, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
           "head_dim": 16, "mlp_size": 64}
    for name, shape in QWEN_SHAPES.items()}

# The paper's headline decode results (owned by tidar_jax.presets): T/NFE at B=16 and the measured speedup, batch 1.
PAPER = PAPER_DECODE

# Dense bf16 peak FLOP/s by device kind (vendor datasheets; first substring match wins, so specific names first).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H800", 989.4e12), ("GH200", 989.4e12),
    ("A100", 312e12), ("L40S", 362e12), ("TPU v6 lite", 918e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)
PEAK_SOURCE = ("vendor datasheet dense bf16 (NVIDIA H100/H200 SXM 989.4, H100 PCIe 756, A100 312, L40S 362; "
               "Google TPU v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s); None for CPUs and unknown kinds")
ATTENTION_KERNELS = ("reference", "blockwise", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; ``DEVICE`` for an accelerator run, ``SMOKE`` for the CPU test."""

    # 1. trained model
    train_model: dict
    train_seq: int
    train_batch: int
    train_block: int
    train_dtype: str
    train_lr: float
    train_wall_cap_s: float  # at most this much training (the rest of the section decodes)
    train_max_steps: int
    eval_windows: int
    decode_blocks: tuple
    decode_batches: tuple
    prompt_len: int
    new_tokens: int
    decode_rounds: int
    # 2./3. random real-shape models
    shapes: dict
    slot_contexts: tuple
    slot_batches: tuple
    slot_max_query: int
    slot_blocks: tuple
    slot_rounds: int
    copy_bytes: int
    loop_prompt_len: int
    loop_new_tokens: int
    loop_models: int  # how many of the shapes (in priority order) get the whole-decode-loop measurement
    # 4. train throughput
    tp_model: str
    tp_seq: int
    tp_batch: int
    tp_layers: tuple  # depths timed; the full-depth figure is extrapolated linearly when the deepest < full
    tp_rounds: int
    tp_remat: bool  # the 1.5B recipe's remat; off in --smoke only (it doubles the tiny step's compile time)
    tp_max_kernels: int  # kernels measured (in ATTENTION_KERNELS order); --smoke: 1, the rest recorded as skipped
    min_section_s: float


DEVICE = Sizes(
    train_model=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, mlp_size=2048,
                     family="qwen2", qkv_bias=True),
    train_seq=1024, train_batch=8, train_block=8, train_dtype="bfloat16", train_lr=6e-4, train_wall_cap_s=180.0,
    train_max_steps=1_000_000, eval_windows=32, decode_blocks=(4, 8), decode_batches=(1, 4, 16), prompt_len=256,
    new_tokens=128, decode_rounds=3,
    shapes=QWEN_SHAPES, slot_contexts=(1024, 4096), slot_batches=(1, 8), slot_max_query=512, slot_blocks=(4, 8, 16),
    slot_rounds=10, copy_bytes=2 << 30, loop_prompt_len=64, loop_new_tokens=256, loop_models=3,
    tp_model="qwen2.5-1.5b", tp_seq=4096, tp_batch=16, tp_layers=(1, 2), tp_rounds=3, tp_remat=True, tp_max_kernels=len(ATTENTION_KERNELS),
    min_section_s=15.0)

SMOKE = Sizes(
    train_model=dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_size=64, family="qwen2",
                     qkv_bias=True),
    train_seq=32, train_batch=4, train_block=4, train_dtype="float32", train_lr=3e-3, train_wall_cap_s=5.0,
    train_max_steps=30, eval_windows=4, decode_blocks=(4,), decode_batches=(2,), prompt_len=12, new_tokens=8,
    decode_rounds=1,
    shapes=SMOKE_SHAPES, slot_contexts=(8,), slot_batches=(1,), slot_max_query=1, slot_blocks=(16,),
    slot_rounds=2, copy_bytes=4 << 20, loop_prompt_len=8, loop_new_tokens=6, loop_models=1,
    tp_model="qwen2.5-1.5b", tp_seq=16, tp_batch=2, tp_layers=(1,), tp_rounds=1, tp_remat=False, tp_max_kernels=1,
    min_section_s=0.0)


class SectionSkipped(Exception):
    """A section (or the part of it that matters) does not fit its budget or is unsupported here."""


# ------------------------------------------------------------------------------------------------------------
# Budget
# ------------------------------------------------------------------------------------------------------------

class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0


def section_allowance(remaining_s: float, name: str, order: tuple) -> float:
    """The share of the unspent budget a section may use: its share over the shares of it and those after it."""
    later = order[order.index(name):]
    return remaining_s * SHARES[name] / sum(SHARES[s] for s in later)


# ------------------------------------------------------------------------------------------------------------
# Figures (pure functions: tests/test_accelerator.py checks them against independent calculations)
# ------------------------------------------------------------------------------------------------------------

def peak_flops(device_kind: str | None) -> float | None:
    if not device_kind:
        return None
    for needle, flops in PEAK_BF16_FLOPS:
        if needle.lower() in device_kind.lower():
            return flops
    return None


def projected_speedup(tokens_per_nfe: float, ar_step_s: float, tidar_step_s: float) -> float:
    """Decode speedup if every step accepts ``tokens_per_nfe`` tokens: tokens per step / relative step cost."""
    return tokens_per_nfe * ar_step_s / tidar_step_s


def weight_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Parameter bytes one AR step reads: every weight, except that an untied input embedding gives one row."""
    total = cfg.num_params * itemsize
    if not cfg.tie_embeddings:
        total -= (cfg.vocab_size - 1) * cfg.hidden_size * itemsize
    return int(total)


def kv_bytes(cfg: ModelConfig, slots: int, itemsize: int) -> int:
    """K and V bytes of ``slots`` cache slots over all layers (what one step's attention reads)."""
    return int(2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.head_dim * itemsize)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return None if not peak or seconds <= 0 else flops / seconds / peak


def extrapolate_depth(step_s_by_depth: dict[int, float], full_depth: int) -> dict[str, float | None]:
    """Linear in depth: step(L) = fixed + L * per_layer, fitted through the two deepest measured depths."""
    depths = sorted(step_s_by_depth)
    if full_depth in step_s_by_depth:
        return {"per_layer_s": None, "fixed_s": None, "full_depth_s": step_s_by_depth[full_depth],
                "extrapolated": False}
    if len(depths) < 2:
        return {"per_layer_s": None, "fixed_s": None, "full_depth_s": None, "extrapolated": True}
    a, b = depths[-2], depths[-1]
    per_layer = (step_s_by_depth[b] - step_s_by_depth[a]) / (b - a)
    fixed = step_s_by_depth[a] - a * per_layer
    return {"per_layer_s": per_layer, "fixed_s": fixed, "full_depth_s": fixed + full_depth * per_layer,
            "extrapolated": True}


# ------------------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------------------

def memory_stats() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def compiled_memory(compiled) -> dict | None:
    """Argument/output/temp bytes XLA planned for a compiled program (None where the backend does not say)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {}
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
                "generated_code_size_in_bytes"):
        value = getattr(m, key, None)
        if value is not None:
            out[key] = int(value)
    if {"argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"} <= set(out):
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              + out["temp_size_in_bytes"] - out.get("alias_size_in_bytes", 0))
    return out


def device_chip():
    """The ``tidar_jax.targets.CHIPS`` entry of the running device (its description, else its name in the device
    kind), or None (a CPU, an unknown kind): the cost model has no datasheet for it."""
    from tidar_jax.targets import CHIPS

    kind = jax.devices()[0].device_kind
    exact = [c for c in CHIPS.values() if c.description == kind]
    named = [c for c in CHIPS.values() if c.name.upper() in kind.upper().replace(" ", "")]
    return (exact or named or [None])[0]


def estimate_of(compiled, dynamic_trips: int = 1) -> dict | None:
    """The cost model's ESTIMATE of one compiled program on the running chip (tidar_jax/analysis/cost_model.py),
    recorded beside its measurement so that a device run calibrates the model: estimated ms, launches, host round
    trips and the assumptions. None where the device has no datasheet entry (CPU)."""
    chip = device_chip()
    if chip is None:
        return None
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram

    try:
        est = estimate(HloProgram.of(compiled), chip, dynamic_trips)
    except Exception as e:  # noqa: BLE001 -- an HLO the reader does not know must not lose the measurement
        return {"error": f"{type(e).__name__}: {str(e).strip()[:200]}"}
    return {"estimate_ms": est.time_s * 1e3, "launches": est.launches, "host_round_trips": est.host_round_trips,
            "flops": est.flops, "bytes": est.bytes, "assumptions": est.assumptions.line()}


def compile_all(lowered: dict[str, Any], workers: int) -> dict[str, Any]:
    """``lowered.compile()`` for every program, in threads (XLA compiles outside the GIL). Tracing/lowering stays
    on the calling thread: nnx graph handling is not meant to run in several threads."""
    if workers <= 1 or len(lowered) <= 1:
        return {name: low.compile() for name, low in lowered.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        return {name: f.result() for name, f in futures.items()}


def compile_workers() -> int:
    return max(1, min(8, cpu_threads()))


def timed_rounds(candidates: dict[str, Callable[[], Any]], rounds: int, deadline: Deadline,
                 sync=jax.block_until_ready) -> dict[str, list[float]]:
    """Interleaved timing (one warm-up call each, then round-robin with rotation); stops early at the deadline
    but always completes at least one timed round."""
    return interleaved(candidates, rounds, warmup=1, sync=sync, stop=deadline.expired)


_SAMPLERS: dict[tuple, Callable] = {}
HOST_RANDOM_MAX = 1 << 22  # arrays up to this many elements are drawn on the host (no compile at all)


def random_array(shape: tuple, dtype, seed: int, scale: float = 1.0) -> jax.Array:
    """Normal(0, scale) values: drawn with numpy for small arrays, else on the device by one jitted sampler per
    distinct (shape, dtype) (drawing billions of values on the host would take minutes)."""
    shape, dtype = tuple(int(d) for d in shape), jnp.dtype(dtype)
    if math.prod(shape) <= HOST_RANDOM_MAX:
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale
        return jnp.asarray(values.astype(dtype))
    key = (shape, str(dtype))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = jax.jit(lambda k, sc: (sc * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return _SAMPLERS[key](jax.random.key(seed), jnp.float32(scale))


def random_params(cfg: ModelConfig, seed: int):
    """``(graphdef, params)`` of a random model (normal(0, 0.02) matrices, unit norm scales and biases) without a
    whole-model init program, whose compile time grows with depth."""
    from tidar_jax.model.functional import abstract_model

    graphdef, abstract = abstract_model(cfg)
    leaves, treedef = jax.tree.flatten(abstract)
    values = [random_array(leaf.shape, leaf.dtype, seed * 100003 + i, 0.02) if len(leaf.shape) >= 2
              else jnp.asarray(np.ones(leaf.shape, leaf.dtype)) for i, leaf in enumerate(leaves)]
    return graphdef, jax.tree.unflatten(treedef, values)


def qwen_config(name: str, sizes: Sizes, **overrides) -> ModelConfig:
    shape = sizes.shapes[name]
    return ModelConfig(**{**shape, "dtype": "bfloat16", "param_dtype": "bfloat16", "mask_token_id": 1,
                          "block_size": 16, **overrides})


# ---- inputs of one forward over a KV cache (the free-slot profilers and the roofline) ----

def random_cache(cfg: ModelConfig, batch: int, context: int, seed: int) -> KVCache:
    """A cache with ``context`` visible slots of random K/V (the values do not change the cost)."""
    shape = (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(random_array(shape, cfg.dtype, seed), random_array(shape, cfg.dtype, seed + 1),
                   jnp.full((batch,), context, jnp.int32))


def plain_inputs(cfg: ModelConfig, batch: int, context: int, q: int, rng):
    """[cache of ``context`` | q new tokens], causal among the new tokens, LM head on all q rows."""
    tokens = rng.integers(0, cfg.vocab_size, (batch, q)).astype(np.int32)
    positions = np.broadcast_to(context + np.arange(q, dtype=np.int32), (batch, q))
    causal = np.tril(np.ones((q, q), bool))
    mask = np.broadcast_to(np.concatenate([np.ones((q, context), bool), causal], axis=1), (batch, q, context + q))
    rows = np.broadcast_to(np.arange(q, dtype=np.int32), (batch, q))
    return tokens, positions, mask, rows


def head_rows(block: int, beta: float = 1.0) -> int:
    """LM-head rows of one engine step: the B draft rows + group k's B slots (+ B group slot-0 rows if beta<1)."""
    return 3 * block if beta != 1.0 else 2 * block


def step_inputs(cfg: ModelConfig, batch: int, context: int, block: int, rng, beta: float = 1.0):
    """The decode engine's TiDAR step: B drafts + B groups of B masks, the decode mask, LM head on the engine's
    rows (``head_rows``: which group does not change the cost)."""
    drafts = rng.integers(0, cfg.vocab_size, (batch, block)).astype(np.int32)
    tokens = np.concatenate([drafts, np.full((batch, block * block), cfg.mask_token_id, np.int32)], axis=1)
    length = jnp.full((batch,), context, jnp.int32)
    positions = np.asarray(masks.decode_positions(length, block))
    mask = np.asarray(masks.decode_mask(length, block, context))
    rows = np.arange(2 * block)
    if beta != 1.0:
        rows = np.concatenate([rows, (np.arange(block) + 1) * block])
    return tokens, positions, mask, np.broadcast_to(rows.astype(np.int32), (batch, rows.size))


def forward(graphdef, params, cache, tokens_NT, positions_NT, mask_NTS, rows_NX):
    """Logits at ``rows`` of one forward over ``cache`` (stacked params or the decoder's per-layer buffers)."""
    from tidar_jax.model import layer_major

    model = layer_major.merge(graphdef, params)
    hidden_NTE, _ = model.hidden(tokens_NT, positions_NT, mask_NTS, cache)
    return model.logits(jnp.take_along_axis(hidden_NTE, rows_NX[:, :, None], axis=1))
