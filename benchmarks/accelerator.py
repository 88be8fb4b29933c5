#!/usr/bin/env python
"""Accelerator evidence suite: one command that measures TiDAR where the paper measures it (one GPU or TPU).

    python benchmarks/accelerator.py --out DIR [--budget-s 440] [--data DIR] [--prompt-file FILE]
    python benchmarks/accelerator.py --smoke --out DIR            # tiny shapes, CPU, < 1 minute (the test)

Sections, run in this order; each gets a share of what is left of ``--budget-s`` and is recorded as skipped (with
the reason) when that share is too small; long loops check the section's deadline and record what they left out:
  1. trained_speedup: train a TiDAR model (78M params, bf16 compute, S=1024, batch 8 on an accelerator) on the
     prepared stdlib corpus for a fixed wall budget; held-out and train AR/diffusion losses; then greedy lossless
     TiDAR (B = 4, 8 and the trained B) and our own AR decode of held-out prompts at batch 1, 4, 16: tokens/s,
     T/NFE, speedup, outputs identical to AR.
  2. free_slots: random bf16 models with the real shapes of Qwen2.5-0.5B, Qwen2.5-1.5B and Qwen3-8B: forward
     latency for q = 1..512 query tokens over a KV cache of 1024 and 4096, batch 1 and 8; the exact TiDAR step at
     B = 4, 8, 16; the speedup projected at the paper's T/NFE from the measured step cost, beside the paper's.
  3. roofline: batch-1 AR step and AR decode loop of those shapes against (weight + KV bytes) / measured copy
     bandwidth.
  4. train_throughput: the Qwen2.5-1.5B train step at S=4096, global batch 16 on one device for every attention
     kernel the installed code and the backend support: tokens/s, MFU, compiled and peak memory, TiDAR/AR step.

Writes ``accelerator.json`` (schema: docs/benchmarks.md), ``accelerator.md`` and PNG plots into ``--out``,
rewriting the JSON and markdown after every section (a run cut short keeps what it measured). Never imports grain.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

from benchmarks import ROOT, cli  # noqa: E402
from benchmarks import bench_common as bc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tidar_jax import masks  # noqa: E402
from tidar_jax.config import ConfigError, ModelConfig  # noqa: E402
from tidar_jax.model import KVCache  # noqa: E402

SCHEMA_VERSION = 1
SECTIONS = ("trained_speedup", "free_slots", "roofline", "train_throughput")
# share of the budget still unspent that a section may use (divided by the shares of it and the sections after it)
SHARES = {"trained_speedup": 0.50, "free_slots": 0.25, "roofline": 0.08, "train_throughput": 0.17}
RESERVE_S = 10.0  # kept back for the final JSON, markdown and plots

# Real shapes (config.json of each base model). The models are random-init: timing does not depend on the weights.
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         head_dim=64, mlp_size=4864, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                         family="qwen2"),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, mlp_size=8960, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                         family="qwen2"),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, mlp_size=12288, rope_theta=1e6, qk_norm=True, tie_embeddings=False,
                     family="qwen3"),
}
# --smoke stand-ins: same families (bias / qk-norm / untied head), tiny widths, so nothing Qwen-sized is compiled
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    name: {**shape, "vocab_size": 256, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
           "head_dim": 16, "mlp_size": 64}
    for name, shape in QWEN_SHAPES.items()}

# The paper's headline decode results (arXiv 2511.08923 Table 2 / section 4.2): T/NFE at B=16 and the measured
# tokens/s speedup over the AR base model, batch 1.
PAPER = {"qwen2.5-1.5b": {"tokens_per_nfe": 7.45, "speedup": 4.71, "block_size": 16, "paper_model": "TiDAR 1.5B"},
         "qwen3-8b": {"tokens_per_nfe": 8.25, "speedup": 5.91, "block_size": 16, "paper_model": "TiDAR 8B"}}

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


def visible_pairs(seq_len: int, block_size: int, objective: str) -> int:
    """(query, key) pairs the training mask allows: causal S(S+1)/2 (AR), plus for TiDAR each mask block of B
    rows seeing its own B masks and the b*B clean tokens before it."""
    causal = seq_len * (seq_len + 1) // 2
    if objective == "ar":
        return causal
    blocks = seq_len // block_size
    return causal + seq_len * block_size + block_size * block_size * blocks * (blocks - 1) // 2


def train_step_flops(cfg: ModelConfig, seq_len: int, batch: int, objective: str) -> int:
    """Model FLOPs of one train step (forward + backward = 3 x forward; remat recomputation not counted):
    2 per multiply-add of every matmul weight for every token through the model (2S for TiDAR, S for AR; the LM
    head on all of them), plus 4 * heads * head_dim per visible (query, key) pair and layer (QK^T and PV)."""
    tokens = 2 * seq_len if objective == "tidar" else seq_len
    d, hd = cfg.hidden_size, cfg.head_dim
    layer_matmul = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.mlp_size
    matmul = 2 * batch * tokens * (cfg.num_layers * layer_matmul + d * cfg.vocab_size)
    attention = 4 * batch * cfg.num_layers * cfg.num_heads * hd * visible_pairs(seq_len, cfg.block_size, objective)
    return int(3 * (matmul + attention))


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


def compile_all(lowered: dict[str, Any], workers: int) -> dict[str, Any]:
    """``lowered.compile()`` for every program, in threads (XLA compiles outside the GIL). Tracing/lowering stays
    on the calling thread: nnx graph handling is not meant to run in several threads."""
    if workers <= 1 or len(lowered) <= 1:
        return {name: low.compile() for name, low in lowered.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
        return {name: f.result() for name, f in futures.items()}


def compile_workers() -> int:
    return max(1, min(8, bc.cpu_threads()))


def timed_rounds(candidates: dict[str, Callable[[], Any]], rounds: int, deadline: Deadline,
                 sync=jax.block_until_ready) -> dict[str, list[float]]:
    """Interleaved timing (one warm-up call each, then round-robin with rotation); stops early at the deadline
    but always completes at least one timed round."""
    return bc.interleaved(candidates, rounds, warmup=1, sync=sync, stop=deadline.expired)


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


# ------------------------------------------------------------------------------------------------------------
# 1. Trained-model speedup
# ------------------------------------------------------------------------------------------------------------

def ensure_corpus(ctx) -> str:
    """The prepared corpus: --data, else data/stdlib (prepared now from the running Python's stdlib if missing;
    --smoke prepares a small one from 40 stdlib files in a temporary dir)."""
    from tidar_jax.data.corpus import prepare_corpus
    from tidar_jax.data.sources import DataError

    if ctx.args.data:
        if not os.path.isfile(os.path.join(ctx.args.data, "manifest.json")):
            raise SectionSkipped(f"--data {ctx.args.data}: no manifest.json there")
        return ctx.args.data
    if ctx.args.smoke:
        path = os.path.join(ctx.tmp, "corpus")
        kwargs = dict(vocab_size=512, max_files=40)
    else:
        path = os.path.join(ROOT, "data", "stdlib")
        kwargs = {}
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        t0 = time.perf_counter()
        try:
            prepare_corpus(path, **kwargs)
        except DataError as e:
            raise SectionSkipped(f"cannot prepare the stdlib corpus in {path}: {e}") from None
        ctx.log(f"prepared the corpus in {path} ({time.perf_counter() - t0:.1f} s)")
    return path


class Corpus:
    """The prepared token files read with numpy memmaps (no grain): random training windows, fixed held-out
    windows."""

    def __init__(self, data_dir: str):
        from tidar_jax.data.corpus import load_manifest
        from tidar_jax.data.shards import TokenStream, split_parts

        self.dir = data_dir
        self.manifest = load_manifest(data_dir)
        # every shard of a split as one stream (sharded format-2 corpora and flat format-1 ones alike)
        self.tokens = {split: TokenStream(split_parts(data_dir, self.manifest, split), self.manifest["dtype"])
                       for split in self.manifest["splits"]}
        tok = self.manifest["tokenizer"]
        self.vocab_size, self.mask_token_id = int(tok["vocab_size"]), int(tok["mask_token_id"])

    def random_windows(self, rng, split: str, count: int, length: int) -> np.ndarray:
        tokens = self.tokens[split]
        if tokens.num_tokens <= length:
            raise SectionSkipped(f"the {split} split of {self.dir} has {tokens.num_tokens} tokens, "
                                 f"fewer than {length + 1}")
        starts = rng.integers(0, tokens.num_tokens - length, size=count)
        return np.stack([tokens.read(int(s), int(s) + length) for s in starts])

    def spread_windows(self, split: str, count: int, length: int) -> np.ndarray:
        """``count`` windows at evenly spaced offsets of the split (deterministic; they cover the whole split)."""
        tokens = self.tokens[split]
        if tokens.num_tokens <= length:
            raise SectionSkipped(f"the {split} split of {self.dir} has {tokens.num_tokens} tokens, "
                                 f"fewer than {length + 1}")
        starts = np.linspace(0, tokens.num_tokens - length, count).astype(np.int64)
        return np.stack([tokens.read(int(s), int(s) + length) for s in starts])


def read_prompt_file(path: str, corpus: Corpus, prompt_len: int) -> list[list[int]]:
    """Prompts of a UTF-8 text file, separated by lines holding only ``---``; each tokenized with the corpus
    tokenizer and cut to its last ``prompt_len`` tokens."""
    from tidar_jax.data.tokenizer import load_tokenizer

    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == "---":
            parts.append("".join(current))
            current = []
        else:
            current.append(line)
    parts.append("".join(current))
    tok = load_tokenizer(corpus.dir)
    prompts = [tok.encode(p).ids[-prompt_len:] for p in parts if p.strip()]
    return [p for p in prompts if p]


def train_model_config(corpus: Corpus, sizes: Sizes) -> ModelConfig:
    heads = sizes.train_model["num_heads"]
    return ModelConfig(**sizes.train_model, vocab_size=corpus.vocab_size, mask_token_id=corpus.mask_token_id,
                       block_size=sizes.train_block, dtype=sizes.train_dtype, param_dtype="float32",
                       head_dim=sizes.train_model["hidden_size"] // heads)


def evaluate(fns, params, windows: np.ndarray, batch: int) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(windows) - batch + 1, batch):
        m = jax.device_get(fns.eval_step(params, jax.device_put(windows[i:i + batch], fns.batch_sharding)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {k: v / n for k, v in sums.items()}
    if "diff_loss" in out:  # the training objective with alpha = 1: (ar + diff) / 2
        out["tidar_loss"] = (out["ar_loss"] + out["diff_loss"]) / 2
    return out


def section_trained_speedup(ctx, deadline: Deadline) -> dict:
    from tidar_jax.decode import Decoder
    from tidar_jax.model.functional import create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import OptimSection
    from tidar_jax.train.step import init_train_state, make_step_fns

    sizes = ctx.sizes
    corpus = Corpus(ensure_corpus(ctx))
    cfg = train_model_config(corpus, sizes)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = create_sharded(cfg, mesh, seed=ctx.args.seed)
    # the number of steps depends on the wall budget: a linear warm-up of 100 steps (1 in --smoke), then constant
    warmup = 100 if not ctx.args.smoke else 1
    optim = OptimSection(name="adamw", lr=sizes.train_lr, min_lr=sizes.train_lr, schedule="constant",
                         warmup_frac=0.01, weight_decay=0.0, clip_norm=1.0)
    fns = make_step_fns(graphdef, cfg, params, mesh, optim, total_steps=100 * warmup, objective="tidar")
    state = init_train_state(fns.tx, params, fns.state_shardings)
    rng = np.random.default_rng(ctx.args.seed)
    S, N = sizes.train_seq, sizes.train_batch

    def batch():
        return jax.device_put(corpus.random_windows(rng, "train", N, S), fns.batch_sharding)

    t0 = time.perf_counter()
    compiled = fns.train_step.lower(state, batch()).compile()
    train_compile_s = time.perf_counter() - t0
    # training gets at most half of what is left (the rest compiles and times the decoders)
    train_s = min(sizes.train_wall_cap_s, 0.5 * deadline.left())
    if train_s <= 0:
        raise SectionSkipped("no time left to train after compiling the train step")
    heldout_windows = corpus.spread_windows("eval", sizes.eval_windows, S)
    curve, pending, heldout_curve = [], [], []
    steps, t_train, eval_s = 0, time.perf_counter(), 0.0
    next_eval = train_s / 6  # a held-out curve (6 points) shows when the model starts to overfit the corpus
    while steps < sizes.train_max_steps:
        state, metrics = compiled(state, batch(), None)
        steps += 1
        pending.append((steps, metrics["loss"]))
        if steps % 20 == 0 or steps == sizes.train_max_steps:
            jax.block_until_ready(metrics)  # bounds the dispatch queue so the wall check means something
            curve += [(s, float(v)) for s, v in jax.device_get(pending)]
            pending = []
            now = time.perf_counter() - t_train - eval_s
            if now >= next_eval and now < train_s:
                t_eval = time.perf_counter()
                h = evaluate(fns, state["params"], heldout_windows, N)
                heldout_curve.append({"step": steps, "train_wall_s": now, **h})
                eval_s += time.perf_counter() - t_eval
                next_eval += train_s / 6
            if now >= train_s:
                break
    jax.block_until_ready(state)
    curve += [(s, float(v)) for s, v in jax.device_get(pending)]
    train_wall = time.perf_counter() - t_train - eval_s
    tokens_seen = steps * N * S

    heldout = evaluate(fns, state["params"], heldout_windows, N)
    heldout_curve.append({"step": steps, "train_wall_s": train_wall, **heldout})
    train_eval = evaluate(fns, state["params"], corpus.random_windows(np.random.default_rng(ctx.args.seed + 1),
                                                                       "train", sizes.eval_windows, S), N)
    gap = heldout["ar_loss"] - train_eval["ar_loss"]
    threshold = max(0.05, 0.05 * train_eval["ar_loss"])
    training = {
        "model_config": cfg.to_dict(), "num_params": cfg.num_params, "seq_len": S, "batch": N,
        "block_size": cfg.block_size, "compute_dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
        "optimizer": f"adamw lr {sizes.train_lr}, {warmup} warm-up steps then constant, clip 1.0", "steps": steps, "wall_s": train_wall,
        "compile_s": train_compile_s, "tokens_seen": tokens_seen, "train_tokens_per_s": tokens_seen / train_wall,
        "epochs_over_train_split": tokens_seen / corpus.tokens["train"].num_tokens,
        "corpus": {"dir": corpus.dir, "train_tokens": int(corpus.tokens["train"].num_tokens),
                   "eval_tokens": int(corpus.tokens["eval"].num_tokens), "vocab_size": corpus.vocab_size},
        "loss_curve": curve[:: max(1, len(curve) // 200)] + ([curve[-1]] if curve else []),
        "final_train_loss": curve[-1][1] if curve else None,
        "heldout": heldout, "train_windows": train_eval, "eval_windows": sizes.eval_windows,
        "heldout_curve": heldout_curve, "eval_wall_s": eval_s,
        "heldout_minus_train_ar_loss": gap, "overfit_threshold": threshold, "overfits": bool(gap > threshold),
    }

    # ---- decode: the trained weights in the compute dtype (what a deployment reads), lossless greedy TiDAR vs AR
    params_state = jax.tree.map(lambda x: x, fns.template)
    nnx.replace_by_pure_dict(params_state, state["params"])
    del state
    dec_cfg = cfg.replace(param_dtype=cfg.dtype)
    params_dec = jax.tree.map(lambda x: x.astype(cfg.dtype), params_state)
    dec = Decoder(dec_cfg, graphdef, params_dec, check_block_size=True, eos_token_id=None)
    rows = max(sizes.decode_batches)
    file_prompts = read_prompt_file(ctx.args.prompt_file, corpus, sizes.prompt_len) if ctx.args.prompt_file else []
    heldout_prompts = [r.tolist() for r in corpus.spread_windows("eval", rows, sizes.prompt_len)]
    prompts = (file_prompts + heldout_prompts)[:max(rows, len(file_prompts))]
    blocks = sorted(set(sizes.decode_blocks) | {cfg.block_size})
    configs = []  # priority order: batch 1 first, AR before TiDAR, the trained B first
    for n in sizes.decode_batches:
        configs.append(("ar", None, n))
        configs += [("tidar", b, n) for b in sorted(blocks, key=lambda b: (b != cfg.block_size, b))]
    results, skipped, first_runs = {}, [], {}
    for mode, b, n in configs:
        name = f"{mode} B={b} batch={n}" if mode == "tidar" else f"ar batch={n}"
        est = max((r["compile_s"] + r["first_run_s"] for r in first_runs.values()), default=0.0)
        if deadline.left() < 1.5 * est:
            skipped.append({"config": name, "reason": f"budget: {deadline.left():.1f} s left, about {est:.1f} s "
                                                      "needed to compile and run it"})
            continue
        kw = dict(mode=mode, max_new_tokens=sizes.new_tokens, eos_token_id=None)
        if mode == "tidar":
            kw.update(block_size=b, beta=1.0, slot0="verifier", allow_untrained_block_size=True)
        batch_prompts = prompts[:n] if n <= len(prompts) else (prompts * n)[:n]
        t0 = time.perf_counter()
        res = dec.generate(batch_prompts, **kw)
        first_runs[name] = {"compile_s": res.stats["compile_s"], "first_run_s": time.perf_counter() - t0
                            - res.stats["compile_s"], "result": res, "call": partial(dec.generate, batch_prompts, **kw),
                            "mode": mode, "block_size": b, "batch": n}
    if not first_runs:
        raise SectionSkipped("no decode configuration fitted the budget after training")
    times = timed_rounds({k: v["call"] for k, v in first_runs.items()}, sizes.decode_rounds, deadline,
                         sync=lambda r: r)
    for name, fr in first_runs.items():
        st = fr["result"].stats
        walls = [s for s in times[name]]
        best = min(walls)
        tokens = sum(st["new_tokens"])
        results[name] = {"mode": fr["mode"], "block_size": fr["block_size"], "batch": fr["batch"],
                         "tokens": tokens, "wall_s_min": best, "wall_s_median": float(np.median(walls)),
                         "rounds": len(walls), "tokens_per_s": tokens / best, "nfe": st["nfe"],
                         "tokens_per_nfe": st["tokens_per_nfe"], "mean_accepted": st["mean_accepted"],
                         "compile_s": fr["compile_s"], "speedup_vs_ar": None, "outputs_identical_to_ar": None,
                         "rows_identical_to_ar": None}
    for name, r in results.items():
        ar = results.get(f"ar batch={r['batch']}")
        if r["mode"] == "tidar" and ar is not None:
            r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
            mine = first_runs[name]["result"].tokens
            theirs = first_runs[f"ar batch={r['batch']}"]["result"].tokens
            same = [a == b for a, b in zip(mine, theirs)]
            r["rows_identical_to_ar"] = int(sum(same))
            r["outputs_identical_to_ar"] = bool(all(same))
    tidar_rows = [r for r in results.values() if r["mode"] == "tidar"]
    checked = [r for r in tidar_rows if r["outputs_identical_to_ar"] is not None]
    best = max(tidar_rows, key=lambda r: r["speedup_vs_ar"] or 0.0, default=None)
    return {
        "training": training,
        "decode": {"prompt_len": sizes.prompt_len, "new_tokens": sizes.new_tokens,
                   "prompts": {"from_file": len(file_prompts), "heldout_windows": len(heldout_prompts),
                               "prompt_file": ctx.args.prompt_file,
                               "heldout_source": f"evenly spaced windows of the held-out split of {corpus.dir} "
                                                 "(held-out stdlib modules)"},
                   "weights_dtype": dec_cfg.param_dtype, "greedy": True, "beta": 1.0, "slot0": "verifier",
                   "rows": list(results.values()), "skipped": skipped},
        "all_outputs_identical": bool(checked) and all(r["outputs_identical_to_ar"] for r in checked),
        "best": None if best is None else {k: best[k] for k in ("block_size", "batch", "tokens_per_s",
                                                                  "tokens_per_nfe", "speedup_vs_ar")},
    }


# ------------------------------------------------------------------------------------------------------------
# 2. Free token slots on real shapes
# ------------------------------------------------------------------------------------------------------------


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


def step_inputs(cfg: ModelConfig, batch: int, context: int, block: int, rng):
    """The decode engine's TiDAR step: B drafts + B groups of B masks, the decode mask, LM head on 2B rows."""
    drafts = rng.integers(0, cfg.vocab_size, (batch, block)).astype(np.int32)
    tokens = np.concatenate([drafts, np.full((batch, block * block), cfg.mask_token_id, np.int32)], axis=1)
    length = jnp.full((batch,), context, jnp.int32)
    positions = np.asarray(masks.decode_positions(length, block))
    mask = np.asarray(masks.decode_mask(length, block, context))
    rows = np.broadcast_to(np.arange(2 * block, dtype=np.int32), (batch, 2 * block))
    return tokens, positions, mask, rows


def _merge(graphdef, params):
    """The model for stacked params or for the decoder's per-layer buffers (``tidar_jax.model.layer_major``, where
    this tidar_jax has it: a scan over stacked weights copies each layer's weights per forward)."""
    try:
        from tidar_jax.model import layer_major
    except ImportError:
        return nnx.merge(graphdef, params)
    return layer_major.merge(graphdef, params)


def decode_params(params):
    """The params in the layout the decoder runs (per-layer buffers where this tidar_jax has them)."""
    try:
        from tidar_jax.model.layer_major import to_layer_major
    except ImportError:
        return params
    return to_layer_major(params)


def _forward(graphdef, params, cache, tokens_NT, positions_NT, mask_NTS, rows_NX):
    model = _merge(graphdef, params)
    hidden_NTE, _ = model.hidden(tokens_NT, positions_NT, mask_NTS, cache)
    return model.logits(jnp.take_along_axis(hidden_NTE, rows_NX[:, :, None], axis=1))


def resolved_kernel(setting: str | None) -> str:
    """The kernel a ``model.attention`` setting runs on this backend ("auto" resolved), for the record."""
    if setting is None:
        return "reference (this tidar_jax has no model.attention setting)"
    try:
        from tidar_jax import attention as registry
        return f"{registry.resolve(setting)} (model.attention={setting})"
    except Exception:  # noqa: BLE001 -- only a label
        return setting


def engine_layouts() -> bool:
    """Whether this tidar_jax's decode engine passes attention layouts (``masks.decode_attention_layout``) instead
    of dense masks; then the model's ``attention`` kernel runs, and the engine-step rows must use the same."""
    return hasattr(masks, "decode_attention_layout")


def _engine_forward(graphdef, block, groups, params, cache, tokens_NT, positions_NT, length_N, rows_NX):
    """The decode engine's step forward with its attention layout, built inside the program as the engine does."""
    model = _merge(graphdef, params)
    layout = masks.decode_attention_layout(length_N, block, cache.k_LNCKD.shape[2], groups=groups)
    hidden_NTE, _ = model.hidden(tokens_NT, positions_NT, layout, cache)
    return model.logits(jnp.take_along_axis(hidden_NTE, rows_NX[:, :, None], axis=1))


def get_random_model(ctx, name: str):
    if name not in ctx.random_models:
        cfg = qwen_config(name, ctx.sizes)
        t0 = time.perf_counter()
        graphdef, params = random_params(cfg, ctx.args.seed)
        params = decode_params(params)  # only forwards and the Decoder use these: the decode layout, once
        jax.block_until_ready(params)
        ctx.random_models[name] = (cfg, graphdef, params, time.perf_counter() - t0)
    return ctx.random_models[name]


def section_free_slots(ctx, deadline: Deadline) -> dict:
    sizes = ctx.sizes
    names = list(sizes.shapes)
    queries = bc.query_grid(sizes.slot_max_query)
    # priority: batch 1 before batch 8, the paper's two models before 0.5B, the shorter context first
    order = sorted(names, key=lambda n: (n not in PAPER, names.index(n)))
    groups = [(name, n, c) for n in sizes.slot_batches for name in order for c in sizes.slot_contexts]
    models: dict[str, dict] = {}
    for name in order:
        cfg = qwen_config(name, sizes)
        models[name] = {"shape": sizes.shapes[name], "num_params": cfg.num_params, "layers_timed": cfg.num_layers,
                        "weight_bytes": cfg.num_params * 2, "init_s": None, "latency": [], "skipped": []}
    group_cost: dict[str, float] = {}
    rng = np.random.default_rng(ctx.args.seed)
    layouts = engine_layouts()
    fwd_cache: dict[str, Callable] = {}
    for name, batch, context in groups:
        est = group_cost.get(name, max(group_cost.values(), default=0.0))
        if deadline.left() < est or deadline.expired():
            models[name]["skipped"].append({"batch": batch, "context": context,
                                            "reason": f"budget: {deadline.left():.1f} s left, a group took "
                                                      f"{est:.1f} s"})
            continue
        t0 = time.perf_counter()
        cfg, graphdef, params, init_s = get_random_model(ctx, name)
        models[name]["init_s"] = init_s
        fwd = fwd_cache.setdefault(name, jax.jit(partial(_forward, graphdef)))
        cache = random_cache(cfg, batch, context, ctx.args.seed)
        specs = [("plain", q, None, plain_inputs(cfg, batch, context, q, rng)) for q in queries]
        specs += [("tidar_step", b * (b + 1), b, step_inputs(cfg, batch, context, b, rng)) for b in sizes.slot_blocks]
        if layouts:  # the engine's AR step is then a separate program (its layout, the model's kernel)
            specs.append(("ar_step", 1, None, plain_inputs(cfg, batch, context, 1, rng)))
        lowered, calls, meta = {}, {}, {}
        length = jnp.full((batch,), context, jnp.int32)
        for kind, q, block, inputs in specs:
            arrays = [jnp.asarray(a) for a in inputs]
            key = f"{kind}/q={q}"
            if layouts and kind != "plain":
                program = jax.jit(partial(_engine_forward, graphdef, block or 1, kind == "tidar_step"))
                args = (params, cache, arrays[0], arrays[1], length, arrays[3])
            else:
                program, args = fwd, (params, cache, *arrays)
            lowered[key] = program.lower(*args)
            calls[key] = args
            meta[key] = {"kind": kind, "batch": batch, "context": context, "query_tokens": q,
                         "block_size": block, "head_rows": int(inputs[3].shape[1])}
        tc = time.perf_counter()
        compiled = compile_all(lowered, compile_workers())
        compile_s = time.perf_counter() - tc
        times = timed_rounds({k: partial(compiled[k], *calls[k]) for k in compiled}, sizes.slot_rounds, deadline)
        for key, samples in times.items():
            s = bc.stats(samples)
            models[name]["latency"].append({**meta[key], "min_ms": s["min"] * 1e3, "median_ms": s["median"] * 1e3,
                                            "rounds": s["n"]})
        base = {r["context"]: r["min_ms"] for r in models[name]["latency"]
                if r["kind"] == "plain" and r["query_tokens"] == 1 and r["batch"] == batch}
        for r in models[name]["latency"]:
            if r["batch"] == batch and r["context"] == context:
                r["vs_q1"] = r["min_ms"] / base[context]
        models[name].setdefault("compile_s", []).append({"batch": batch, "context": context, "programs": len(lowered),
                                                         "seconds": compile_s})
        del cache, compiled, lowered, calls
        group_cost[name] = time.perf_counter() - t0

    projections = []
    for name, paper in PAPER.items():
        if name not in models:
            continue
        lat = {(r["kind"], r["batch"], r["context"], r["query_tokens"]): r["min_ms"] for r in models[name]["latency"]}
        b = paper["block_size"]
        for batch in sizes.slot_batches:
            for context in sizes.slot_contexts:
                ar = lat.get(("ar_step" if layouts else "plain", batch, context, 1))
                step = lat.get(("tidar_step", batch, context, b * (b + 1)))
                if ar is None or step is None:
                    continue
                projections.append({
                    "model": name, "paper_model": paper["paper_model"], "batch": batch, "context": context,
                    "block_size": b, "paper_tokens_per_nfe": paper["tokens_per_nfe"], "ar_step_ms": ar,
                    "tidar_step_ms": step, "step_cost_ratio": step / ar,
                    "projected_speedup": projected_speedup(paper["tokens_per_nfe"], ar, step),
                    "paper_speedup": paper["speedup"]})
    for name in models:
        if not models[name]["latency"]:
            models[name]["skipped"].insert(0, {"batch": None, "context": None, "reason": "no group fitted"})
    if not any(m["latency"] for m in models.values()):
        raise SectionSkipped("no (model, batch, context) group fitted the budget")
    return {"models": models, "projections": projections, "queries": queries, "blocks": list(sizes.slot_blocks),
            "contexts": list(sizes.slot_contexts), "batches": list(sizes.slot_batches), "statistic": "min",
            "dtype": "bfloat16", "engine_layouts": layouts,
            "attention_kernel": resolved_kernel(getattr(qwen_config(order[0], sizes), "attention", None)),
            "note": ("random-init weights with the real shapes; plain rows: [KV cache | q tokens] with the LM head "
                     "on all q rows, dense masks (reference kernel); tidar_step rows: the decode engine's step "
                     "forward (q = B(B+1), head on 2B rows) and ar_step rows its AR step, each with the engine's "
                     "attention layout and the model's kernel when engine_layouts (else the same dense masks the "
                     "engine uses, and the AR step is the plain q=1 row); projected speedup = paper T/NFE x AR step "
                     "/ TiDAR step at B=16 (the forward only: sampling, cache writes and prefill are not in it)")}


# ------------------------------------------------------------------------------------------------------------
# 3. AR decode vs the memory roofline
# ------------------------------------------------------------------------------------------------------------

def measure_copy_bandwidth(nbytes: int, rounds: int, deadline: Deadline) -> dict:
    """Device copy bandwidth (bytes read + written per second) of ``y = x + 1`` on a donated float32 buffer."""
    n = nbytes // 4
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    buf = [jnp.zeros(n, jnp.float32)]

    def step():
        buf[0] = copy(buf[0])
        return buf[0]

    times = timed_rounds({"copy": step}, max(rounds, 3), deadline)["copy"]
    best = min(times)
    return {"array_bytes": n * 4, "copy_ms_min": best * 1e3, "copy_gb_s": 2 * n * 4 / best / 1e9,
            "rounds": len(times)}


def section_roofline(ctx, deadline: Deadline) -> dict:
    from tidar_jax.decode import Decoder

    sizes = ctx.sizes
    bw = measure_copy_bandwidth(sizes.copy_bytes, sizes.slot_rounds, deadline)
    bytes_per_s = bw["copy_gb_s"] * 1e9
    slots = ctx.results["sections"]["free_slots"].get("models") or {}
    rows, loops, skipped = [], [], []
    names = sorted(sizes.shapes, key=lambda n: (n not in PAPER, list(sizes.shapes).index(n)))
    rng = np.random.default_rng(ctx.args.seed)
    for name in names:
        cfg = qwen_config(name, sizes)
        w = weight_bytes_per_token(cfg, 2)
        ar_kind = "ar_step" if engine_layouts() else "plain"  # the engine's AR step (see section_free_slots)
        measured = {r["context"]: r for r in (slots.get(name) or {}).get("latency", [])
                    if r["kind"] == ar_kind and r["batch"] == 1 and r["query_tokens"] == 1}
        for context in sizes.slot_contexts:
            r = measured.get(context)
            if r is None:  # free_slots skipped this one: time the AR step here
                if deadline.left() < 5:
                    skipped.append({"model": name, "context": context, "what": "ar_step", "reason": "budget"})
                    continue
                mcfg, graphdef, params, _ = get_random_model(ctx, name)
                args = (params, random_cache(mcfg, 1, context, ctx.args.seed),
                        *[jnp.asarray(a) for a in plain_inputs(mcfg, 1, context, 1, rng)])
                fn = jax.jit(partial(_forward, graphdef)).lower(*args).compile()
                t = timed_rounds({"s": partial(fn, *args)}, sizes.slot_rounds, deadline)["s"]
                step_ms = min(t) * 1e3
            else:
                step_ms = r["min_ms"]
            kv = kv_bytes(cfg, context, 2)
            bound_ms = (w + kv) / bytes_per_s * 1e3
            rows.append({"model": name, "context": context, "weight_bytes": w, "kv_bytes": kv,
                         "bytes_per_step": w + kv, "bound_ms": bound_ms, "ar_step_ms": step_ms,
                         "tokens_per_s": 1e3 / step_ms, "bound_tokens_per_s": 1e3 / bound_ms,
                         "fraction_of_roofline": bound_ms / step_ms})
    # the real decode loop (prefill + steps in one while_loop), batch 1, if the budget allows
    loop_est = 0.0
    for i, name in enumerate(names):
        if i >= sizes.loop_models:
            skipped.append({"model": name, "what": "ar_loop", "reason": "not measured at this size"})
            continue
        if deadline.left() < max(10.0 if not ctx.args.smoke else 0.0, 1.5 * loop_est):
            skipped.append({"model": name, "what": "ar_loop", "reason": f"budget: {deadline.left():.1f} s left"})
            continue
        t0 = time.perf_counter()
        cfg, graphdef, params, _ = get_random_model(ctx, name)
        dec = Decoder(cfg, graphdef, params, eos_token_id=None)
        prompt = [int(t) for t in rng.integers(2, cfg.vocab_size, sizes.loop_prompt_len)]
        kw = dict(mode="ar", max_new_tokens=sizes.loop_new_tokens, eos_token_id=None)
        first = dec.generate([prompt], **kw)
        walls = timed_rounds({"loop": partial(dec.generate, [prompt], **kw)}, 3, deadline, sync=lambda r: r)["loop"]
        best = min(walls)
        new = sum(first.stats["new_tokens"])
        slots_read = sizes.loop_prompt_len + sizes.loop_new_tokens  # visible slots at the end of the run
        w = weight_bytes_per_token(cfg, 2)
        loop_bound = (w + kv_bytes(cfg, slots_read, 2)) / bytes_per_s
        loops.append({"model": name, "prompt_len": sizes.loop_prompt_len, "new_tokens": new,
                      "wall_s_min": best, "ms_per_token": best / new * 1e3, "tokens_per_s": new / best,
                      "bound_ms_per_token": loop_bound * 1e3, "fraction_of_roofline": loop_bound / (best / new),
                      "compile_s": first.stats["compile_s"]})
        loop_est = time.perf_counter() - t0
    return {"bandwidth": bw, "ar_step": rows, "ar_loop": loops, "skipped": skipped,
            "note": ("bound = (weight bytes + K/V bytes of the visible cache) / measured copy bandwidth; weights "
                     "bf16, an untied input embedding counted as one row; ar_step is the batch-1 forward of one "
                     "token over a full cache (free_slots q=1 row); ar_loop includes the prefill, amortised, and "
                     "its bound uses the cache at the end of the run (an upper bound on the bytes per token)")}


# ------------------------------------------------------------------------------------------------------------
# 4. Training throughput per attention kernel
# ------------------------------------------------------------------------------------------------------------

def attention_kernels() -> tuple[list[str], list[dict], str]:
    """Kernels the installed code accepts (``model.attention``), the ones it rejects, and how that was found."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if "attention" not in fields:
        return ["reference"], [{"kernel": k, "reason": "this tidar_jax has no model.attention setting; its only "
                                "kernel is the dense reference"} for k in ATTENTION_KERNELS if k != "reference"], \
            "ModelConfig has no 'attention' field"
    try:
        from tidar_jax import attention as registry
    except ImportError:
        registry = None
    resolve = getattr(registry, "resolve", None)
    ok, rejected = [], []
    for k in ATTENTION_KERNELS:
        try:
            ModelConfig(attention=k)
            if resolve is not None:
                resolve(k)  # registered in this build? (e.g. cudnn/splash may be named but not built yet)
            ok.append(k)
        except (ConfigError, ValueError, TypeError, KeyError) as e:
            rejected.append({"kernel": k, "reason": f"installed code rejects it: {str(e).splitlines()[0]}"})
    return ok, rejected, ("ModelConfig(attention=...) validation" + (" and tidar_jax.attention.resolve()"
                                                                      if resolve is not None else ""))


def measure_matmul_flops(deadline: Deadline, n: int) -> dict:
    """Achieved bf16 matmul FLOP/s on an n x n x n product (the ceiling this device reaches here)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    times = timed_rounds({"mm": partial(mm, a, a)}, 5, deadline)["mm"]
    return {"n": n, "seconds_min": min(times), "flops_per_s": 2 * n ** 3 / min(times)}


def choose_micro_batch(cfg: ModelConfig, seq: int, batch: int, kernel: str, limit: int | None) -> int:
    """Rows per micro-batch: the largest power-of-two divisor of the batch whose rough activation estimate
    (f32 logits + their gradient, dense f32 attention scores for the reference kernel, bf16 layer activations)
    stays under 40 % of the device memory (the other kernels' train states share it). No limit (CPU): the whole
    batch."""
    if not limit:
        return batch
    tokens = 2 * seq
    per_row = tokens * cfg.vocab_size * 4 * 3 + tokens * cfg.hidden_size * 2 * 24 * cfg.num_layers
    if kernel == "reference":
        per_row += cfg.num_heads * tokens * tokens * (4 + 4 + 2)
    m = batch
    while m > 1 and (m * per_row > 0.4 * limit or batch % m):
        m //= 2
    return max(m, 1)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def section_train_throughput(ctx, deadline: Deadline) -> dict:
    """All (kernel, objective, depth) programs are lowered, compiled together in threads and timed interleaved,
    so the kernels are compared within one run; a kernel that fails to lower, compile or run is recorded as
    skipped with the error and the others go on."""
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import OptimSection
    from tidar_jax.train.step import init_train_state, make_step_fns

    sizes = ctx.sizes
    ctx.random_models.clear()  # the random decode models are done with: free their memory first
    gc.collect()
    kinds, rejected, how = attention_kernels()
    has_field = "attention" in {f.name for f in dataclasses.fields(ModelConfig)}
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind)
    mm = measure_matmul_flops(deadline, 256 if ctx.args.smoke else 8192)
    mem = memory_stats()
    limit = mem.get("bytes_limit") if mem else None
    full = qwen_config(sizes.tp_model, sizes)
    S, N = sizes.tp_seq, sizes.tp_batch
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tokens = np.random.default_rng(ctx.args.seed).integers(0, full.vocab_size - 1, (N, S)).astype(np.int32)
    kernels: dict[str, dict] = {k["kernel"]: {"status": "skipped", "reason": k["reason"]} for k in rejected}
    for kernel in kinds[sizes.tp_max_kernels:]:
        kernels[kernel] = {"status": "skipped", "reason": f"this size measures the first {sizes.tp_max_kernels} "
                                                          "kernel(s) only"}
    kinds = kinds[:sizes.tp_max_kernels]
    lowered, meta = {}, {}
    for kernel in kinds:
        micro = choose_micro_batch(full, S, N, kernel, limit)
        kernels[kernel] = {"status": "ok", "reason": None, "grad_accum": N // micro, "micro_batch": micro,
                           "objectives": {}}
        try:
            for objective in ("tidar", "ar"):
                for depth in sizes.tp_layers:
                    cfg = full.replace(num_layers=depth, param_dtype="float32",
                                       **({"attention": kernel} if has_field else {}))
                    graphdef, _ = abstract_model(cfg, remat=sizes.tp_remat)
                    _, params = random_params(cfg, ctx.args.seed)  # no init program to compile
                    optim = OptimSection(name="adam", lr=1e-5, min_lr=1e-5, schedule="constant", warmup_frac=0.0,
                                         grad_accum=N // micro)
                    fns = make_step_fns(graphdef, cfg, params, mesh, optim, 1, objective)
                    state = init_train_state(fns.tx, params, fns.state_shardings)
                    batch = jax.device_put(tokens, fns.batch_sharding)
                    key = (kernel, objective, depth)
                    lowered[key] = fns.train_step.lower(state, batch)
                    meta[key] = {"state": [state], "batch": batch, "cfg": cfg}
        except Exception as e:  # noqa: BLE001 -- e.g. a kernel this backend has no lowering for
            traceback.print_exc()
            kernels[kernel] = {"status": "skipped", "reason": f"lowering failed: {_first_line(e)}"}
            for key in [k for k in lowered if k[0] == kernel]:
                del lowered[key], meta[key]
    if deadline.expired():
        raise SectionSkipped(f"budget: spent {deadline.seconds:.0f} s before compiling the train steps")
    tc = time.perf_counter()
    compiled = {}
    with ThreadPoolExecutor(max_workers=compile_workers()) as pool:
        futures = {key: pool.submit(low.compile) for key, low in lowered.items()}
        for key, future in futures.items():
            try:
                compiled[key] = future.result()
            except Exception as e:  # noqa: BLE001
                if kernels[key[0]]["status"] == "ok":
                    kernels[key[0]] = {"status": "skipped", "reason": f"compile failed: {_first_line(e)}"}
    compile_s = time.perf_counter() - tc
    del lowered
    compiled = {k: v for k, v in compiled.items() if kernels[k[0]]["status"] == "ok"}
    for kernel in kinds:
        if kernels[kernel]["status"] == "ok":
            kernels[kernel]["compile_s"] = compile_s  # all kernels' programs compiled together

    def call(key):
        m = meta[key]
        m["state"][0], metrics = compiled[key](m["state"][0], m["batch"], None)
        return metrics

    times: dict = {}
    try:
        times = timed_rounds({k: partial(call, k) for k in compiled}, sizes.tp_rounds, deadline)
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory at run time: time the kernels one by one
        traceback.print_exc()
        for key in list(compiled):
            if kernels[key[0]]["status"] != "ok":
                continue
            try:
                times.update(timed_rounds({key: partial(call, key)}, sizes.tp_rounds, deadline))
            except Exception as e2:  # noqa: BLE001
                kernels[key[0]] = {"status": "skipped", "reason": f"running failed: {_first_line(e2)}"}
    peak_mem = memory_stats()
    for kernel in kinds:
        entry = kernels[kernel]
        if entry["status"] != "ok":
            continue
        for objective in ("tidar", "ar"):
            by_depth, rows = {}, []
            for depth in sizes.tp_layers:
                key = (kernel, objective, depth)
                t = min(times[key])
                by_depth[depth] = t
                flops = train_step_flops(meta[key]["cfg"], S, N, objective)
                rows.append({"layers": depth, "step_s": t, "tokens_per_s": N * S / t, "model_flops": flops,
                             "mfu": mfu(flops, t, peak), "mfu_vs_measured_matmul": mfu(flops, t, mm["flops_per_s"]),
                             "compiled_memory": compiled_memory(compiled[key]), "rounds": len(times[key])})
            ext = extrapolate_depth(by_depth, full.num_layers)
            full_s = ext["full_depth_s"]
            ok = bool(full_s and full_s > 0)
            full_flops = train_step_flops(full, S, N, objective)
            entry["objectives"][objective] = {
                "by_depth": rows, **ext, "full_depth": full.num_layers,
                "full_tokens_per_s": N * S / full_s if ok else None, "full_model_flops": full_flops,
                "full_mfu": mfu(full_flops, full_s, peak) if ok else None}
        entry["peak_memory"] = peak_mem
        t_tidar, t_ar = (entry["objectives"][o]["full_depth_s"] for o in ("tidar", "ar"))
        entry["tidar_over_ar_step"] = {str(d): min(times[(kernel, "tidar", d)]) / min(times[(kernel, "ar", d)])
                                       for d in sizes.tp_layers}
        entry["tidar_over_ar_step_full"] = t_tidar / t_ar if t_tidar and t_ar and t_ar > 0 else None
    del compiled, meta
    gc.collect()
    if not any(k.get("status") == "ok" for k in kernels.values()):
        raise SectionSkipped("no attention kernel could be measured: " + "; ".join(
            f"{n}: {k['reason']}" for n, k in kernels.items()))
    return {"model": sizes.tp_model, "model_config": full.to_dict(), "seq_len": S, "global_batch": N,
            "remat": sizes.tp_remat, "param_dtype": "float32", "compute_dtype": "bfloat16", "layers_timed": list(sizes.tp_layers),
            "kernels": kernels, "kernel_detection": how, "device_kind": device_kind,
            "peak_flops_per_s": peak, "peak_flops_source": PEAK_SOURCE, "measured_matmul": mm,
            "memory_before": mem,
            "memory_note": ("peak_memory is jax's process-wide peak (device.memory_stats(), None on CPU) after all "
                            "kernels' steps, so it also covers earlier sections and the other kernels; "
                            "compiled_memory is XLA's plan for that one program"),
            "flops_note": ("model FLOPs = 3 x forward: 2 per weight per token through the model (2S for TiDAR, "
                           "S for AR, LM head included) + 4 x heads x head_dim per visible (query, key) pair per "
                           "layer; full-depth figures are extrapolated linearly from the timed depths")}


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Accelerator evidence suite", "",
             f"Device: {m['device_count']} x {m['device_kind']} ({m['backend']}), jax {m['jax_version']}, "
             f"jaxlib {m['jaxlib_version']}; {'SMOKE (tiny shapes, numbers mean nothing)' if result['smoke'] else ''}",
             f"Command: `{result['command']}`; budget {result['budget_s']:.0f} s, "
             f"elapsed {result['elapsed_s']:.0f} s.", ""]
    for name in SECTIONS:
        sec = result["sections"][name]
        lines += [f"## {name}: {sec['status']}" + (f" ({sec['reason']})" if sec["reason"] else ""), "",
                  f"Reproduce: `{sec['command']}`", ""]
        if sec["status"] != "ok":
            continue
        if name == "trained_speedup":
            t = sec["training"]
            lines += [f"Trained {t['num_params'] / 1e6:.1f}M params, S={t['seq_len']}, batch {t['batch']}, "
                      f"B={t['block_size']}, {t['steps']} steps in {t['wall_s']:.0f} s "
                      f"({t['epochs_over_train_split']:.2f} epochs). Held-out AR loss "
                      f"{t['heldout']['ar_loss']:.3f}, diffusion loss {_f(t['heldout'].get('diff_loss'), '{:.3f}')}; "
                      f"train-window AR loss {t['train_windows']['ar_loss']:.3f}; overfits: {t['overfits']}.", "",
                      "| decode | batch | tokens/s | T/NFE | speedup vs AR | identical to AR |",
                      "|---|---|---|---|---|---|"]
            for r in sec["decode"]["rows"]:
                label = "AR" if r["mode"] == "ar" else f"TiDAR B={r['block_size']}"
                lines.append(f"| {label} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_nfe']:.2f} | "
                             f"{_f(r['speedup_vs_ar'])} | {_f(r['outputs_identical_to_ar'], '{}')} |")
            lines.append("")
        elif name == "free_slots":
            lines += ["| model | batch | context | AR step ms | TiDAR B=16 step ms | step cost | projected speedup "
                      "at paper T/NFE | paper |", "|---|---|---|---|---|---|---|---|"]
            for p in sec["projections"]:
                lines.append(f"| {p['model']} | {p['batch']} | {p['context']} | {p['ar_step_ms']:.3f} | "
                             f"{p['tidar_step_ms']:.3f} | {p['step_cost_ratio']:.2f}x | "
                             f"{p['projected_speedup']:.2f}x (T/NFE {p['paper_tokens_per_nfe']}) | "
                             f"{p['paper_speedup']}x |")
            lines.append("")
        elif name == "roofline":
            lines += [f"Copy bandwidth {sec['bandwidth']['copy_gb_s']:.1f} GB/s.", "",
                      "| model | context | MB/step | bound ms | AR step ms | tokens/s | of roofline |",
                      "|---|---|---|---|---|---|---|"]
            for r in sec["ar_step"]:
                lines.append(f"| {r['model']} | {r['context']} | {r['bytes_per_step'] / 1e6:.1f} | "
                             f"{r['bound_ms']:.3f} | {r['ar_step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
                             f"{r['fraction_of_roofline']:.0%} |")
            for r in sec["ar_loop"]:
                lines.append(f"| {r['model']} AR loop | - | - | {r['bound_ms_per_token']:.3f} | "
                             f"{r['ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {r['fraction_of_roofline']:.0%} |")
            lines.append("")
        elif name == "train_throughput":
            lines += [f"{sec['model']} train step, S={sec['seq_len']}, global batch {sec['global_batch']}, "
                      f"{'remat' if sec['remat'] else 'no remat'}; "
                      f"peak {_f(sec['peak_flops_per_s'] and sec['peak_flops_per_s'] / 1e12, '{:.0f}')} TFLOP/s "
                      f"(datasheet), measured matmul {sec['measured_matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s.", "",
                      "| kernel | objective | layers | step s | tokens/s | MFU | full-depth tokens/s (est.) | "
                      "full MFU | TiDAR/AR |", "|---|---|---|---|---|---|---|---|---|"]
            for k, e in sec["kernels"].items():
                if e["status"] != "ok":
                    lines.append(f"| {k} | skipped: {e['reason']} | | | | | | | |")
                    continue
                for obj, o in e["objectives"].items():
                    for r in o["by_depth"]:
                        lines.append(f"| {k} | {obj} | {r['layers']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                                     f"{_f(r['mfu'], '{:.1%}')} | {_f(o['full_tokens_per_s'], '{:.0f}')} | "
                                     f"{_f(o['full_mfu'], '{:.1%}')} | "
                                     f"{_f(e['tidar_over_ar_step'][str(r['layers'])])} |")
            lines.append("")
    if result["plots"]:
        lines += ["## Plots", ""] + [f"- `{p['path']}`: {p['what']} (`{p['command']}`)" for p in result["plots"]]
    return "\n".join(lines) + "\n"


def make_plots(result: dict, out: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []

    def save(fig, name, what, section):
        path = os.path.join(out, name)
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        plots.append({"path": name, "what": what, "section": section,
                      "command": result["sections"][section]["command"]})

    s1 = result["sections"]["trained_speedup"]
    if s1["status"] == "ok":
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
        curve = s1["training"]["loss_curve"]
        a.plot([c[0] for c in curve], [c[1] for c in curve])
        if s1["training"]["heldout"].get("tidar_loss") is not None:
            a.axhline(s1["training"]["heldout"]["tidar_loss"], color="C1", ls="--", label="held-out TiDAR loss")
        a.set(xlabel="step", ylabel="TiDAR loss", title="training")
        a.legend()
        rows = s1["decode"]["rows"]
        labels = [("AR" if r["mode"] == "ar" else f"B={r['block_size']}") + f"\nN={r['batch']}" for r in rows]
        b.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
              color=["C0" if r["mode"] == "ar" else "C2" for r in rows])
        b.set_xticks(range(len(rows)), labels, fontsize=7)
        b.set(ylabel="tokens/s", title="decode (trained model)")
        save(fig, "trained_speedup.png", "training loss and decode tokens/s", "trained_speedup")
    s2 = result["sections"]["free_slots"]
    if s2["status"] == "ok":
        names = [n for n, m in s2["models"].items() if m["latency"]]
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            lat = s2["models"][name]["latency"]
            for i, (batch, ctxlen) in enumerate(sorted({(r["batch"], r["context"]) for r in lat})):
                pts = sorted((r["query_tokens"], r["min_ms"]) for r in lat if r["kind"] == "plain"
                             and r["batch"] == batch and r["context"] == ctxlen)
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"N={batch} L={ctxlen}")
                st = [(r["query_tokens"], r["min_ms"]) for r in lat if r["kind"] == "tidar_step"
                      and r["batch"] == batch and r["context"] == ctxlen]
                if st:
                    ax.plot(*zip(*st), "x", color=f"C{i}", ms=10)
            ax.set(xscale="log", yscale="log", xlabel="query tokens q (x: TiDAR step)", ylabel="ms", title=name)
            ax.legend(fontsize=7)
        save(fig, "free_slots.png", "forward latency vs query tokens", "free_slots")
    s3 = result["sections"]["roofline"]
    if s3["status"] == "ok" and s3["ar_step"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = s3["ar_step"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["bound_ms"] for r in rows], 0.4, label="bandwidth bound")
        ax.bar(x + 0.2, [r["ar_step_ms"] for r in rows], 0.4, label="measured AR step")
        ax.set_xticks(x, [f"{r['model']}\nL={r['context']}" for r in rows], fontsize=7)
        ax.set(ylabel="ms per token (batch 1)")
        ax.legend()
        save(fig, "roofline.png", "AR step vs memory roofline", "roofline")
    s4 = result["sections"]["train_throughput"]
    if s4["status"] == "ok":
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, values = [], []
        for k, e in s4["kernels"].items():
            if e["status"] == "ok":
                for obj, o in e["objectives"].items():
                    labels.append(f"{k}\n{obj}")
                    values.append(o["full_tokens_per_s"] or 0.0)
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set(ylabel="train tokens/s (full depth, est.)", title=f"{s4['model']} S={s4['seq_len']}")
        save(fig, "train_throughput.png", "train tokens/s per attention kernel", "train_throughput")
    return plots


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------

SECTION_FNS = {"trained_speedup": section_trained_speedup, "free_slots": section_free_slots,
               "roofline": section_roofline, "train_throughput": section_train_throughput}


def machine() -> dict:
    info = bc.machine_info()
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    kind = jax.devices()[0].device_kind
    return {**info, "backend": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": jaxlib_version,
            "peak_bf16_flops_per_s": peak_flops(kind), "peak_flops_source": PEAK_SOURCE,
            "memory": memory_stats()}


def reproduce_command(args, sections=None) -> str:
    parts = ["python", "benchmarks/accelerator.py"]
    if args.smoke:
        parts.append("--smoke")
    parts += ["--budget-s", f"{args.budget_s:g}", "--out", args.out]
    if args.data:
        parts += ["--data", args.data]
    if args.prompt_file:
        parts += ["--prompt-file", args.prompt_file]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if sections:
        parts += ["--sections", ",".join(sections)]
    return shlex.join(parts)


class Context:
    def __init__(self, args, sizes: Sizes, result: dict, tmp: str):
        self.args, self.sizes, self.results, self.tmp = args, sizes, result, tmp
        self.random_models: dict[str, tuple] = {}

    def log(self, msg: str):
        print(f"[accelerator {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_outputs(result: dict, out: str):
    bc.write_json(os.path.join(out, "accelerator.json"), result)
    bc.write_text(os.path.join(out, "accelerator.md"), markdown(result))


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "out", out=dict(required=True, default=None,
                                      help="output directory (accelerator.json, accelerator.md, PNGs)"))
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget in seconds for the suite after start-up (default 440: with imports, "
                        "about 8 minutes; --smoke: 3600, so every section runs however busy the machine)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (the CPU test); numbers mean "
                                                       "nothing")
    cli.add_shared(p, "data", data=dict(help="prepared corpus dir (default data/stdlib, prepared from the stdlib if "
                                             "missing)"))
    p.add_argument("--prompt-file", help="extra decode prompts: UTF-8 text, prompts separated by lines '---'")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    cli.add_shared(p, "seed")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.smoke else 440.0  # smoke: every section runs, however busy the machine
    if not args.budget_s > 0:
        cli.fail(f"--budget-s={args.budget_s:g}: must be > 0 seconds")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad or not wanted:
        cli.fail(f"--sections={args.sections!r}: must be a comma-separated subset of {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in wanted]
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        cli.fail(f"--prompt-file={args.prompt_file}: no such file")
    if args.data and not os.path.isfile(os.path.join(args.data, "manifest.json")):
        cli.fail(f"--data={args.data}: no manifest.json there (prepare it with python -m tidar_jax.data.prepare)")
    return args


def empty_section(name: str, args) -> dict:
    return {"status": "not_run", "reason": "not in --sections", "elapsed_s": 0.0, "process_cpu_s": 0.0,
            "allowance_s": None,
            "command": reproduce_command(args, [name])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes = SMOKE if args.smoke else DEVICE
    os.makedirs(args.out, exist_ok=True)
    result = {"schema_version": SCHEMA_VERSION, "suite": "accelerator", "smoke": args.smoke,
              "command": reproduce_command(args), "argv": sys.argv[1:] if argv is None else list(argv),
              "budget_s": args.budget_s, "elapsed_s": 0.0, "machine": machine(), "sizes": dataclasses.asdict(sizes),
              "sections": {name: empty_section(name, args) for name in SECTIONS}, "plots": []}
    with tempfile.TemporaryDirectory(prefix="tidar-accel-") as tmp:
        ctx = Context(args, sizes, result, tmp)
        ctx.log(f"{result['machine']['device_count']} x {result['machine']['device_kind']} "
                f"({result['machine']['backend']}), jax {jax.__version__}; budget {args.budget_s:g} s")
        for name in args.sections:
            remaining = args.budget_s - (time.perf_counter() - t_start) - RESERVE_S
            allowance = section_allowance(remaining, name, tuple(args.sections))
            sec = result["sections"][name]
            sec["allowance_s"] = allowance
            t0, c0 = time.perf_counter(), time.process_time()
            if allowance < max(sizes.min_section_s, 1e-9):
                sec.update(status="skipped", reason=f"budget: {max(allowance, 0):.1f} s for this section, needs "
                                                    f"at least {sizes.min_section_s:g} s")
            else:
                ctx.log(f"section {name}: {allowance:.0f} s")
                try:
                    sec.update(SECTION_FNS[name](ctx, Deadline(allowance)), status="ok", reason=None)
                except SectionSkipped as e:
                    sec.update(status="skipped", reason=str(e))
                except Exception as e:  # noqa: BLE001 -- one failing section must not lose the others' evidence
                    traceback.print_exc()
                    sec.update(status="error", reason=f"{type(e).__name__}: {str(e).strip()[:500]}")
            sec["elapsed_s"] = time.perf_counter() - t0
            sec["process_cpu_s"] = time.process_time() - c0  # all threads: compile + run, whatever the load
            result["elapsed_s"] = time.perf_counter() - t_start
            ctx.log(f"section {name}: {sec['status']} in {sec['elapsed_s']:.1f} s"
                    + (f" ({sec['reason']})" if sec["reason"] else ""))
            write_outputs(result, args.out)
        ctx.random_models.clear()
    try:
        result["plots"] = make_plots(result, args.out)
    except Exception as e:  # noqa: BLE001 -- plots are a convenience; the JSON is the evidence
        traceback.print_exc()
        result["plot_error"] = f"{type(e).__name__}: {e}"
    result["elapsed_s"] = time.perf_counter() - t_start
    write_outputs(result, args.out)
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
