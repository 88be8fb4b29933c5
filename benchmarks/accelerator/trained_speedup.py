"""Section 1: train a TiDAR model for a fixed wall budget, then decode held-out prompts (AR vs TiDAR).
"""

from __future__ import annotations

import os
import time
from functools import partial

from benchmarks import ROOT

import jax
import numpy as np
from flax import nnx

from tidar_jax.config import ModelConfig

from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)

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
        "step_s_mean": train_wall / max(steps, 1), "step_estimate": estimate_of(compiled),
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
