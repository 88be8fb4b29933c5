#!/usr/bin/env python
"""Train-step time of the TiDAR objective (doubled 2S sequence) vs a plain AR objective (S) on the same model.

Both steps are compiled first, then timed interleaved (TiDAR, AR, TiDAR, AR, ...) so machine noise hits both
alike; the ratio comes from one run.  Writes ``benchmarks/results/train_step.{json,md}``.

    python benchmarks/train_step.py                       # the tiny preset's model, batch and S
    python benchmarks/train_step.py --rounds 5 model.num_layers=1 data.seq_len=32   # smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    p.add_argument("--rounds", type=int, default=20, help="timed (TiDAR, AR) pairs after warm-up")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocab (default: model.vocab_size)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: must be >= 1")

    import jax

    from tidar_jax.config import ConfigError
    from tidar_jax.model.functional import create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import load_config
    from tidar_jax.train.distributed import resolve_mesh_shape
    from tidar_jax.train.step import init_train_state, make_step_fns

    try:
        cfg = load_config(args.config, args.overrides)
        mcfg = cfg.model_config(mask_token_id=(cfg.model.arch.get("vocab_size") or 512) - 1)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    mesh_shape = resolve_mesh_shape(cfg.mesh, jax.device_count())
    mesh = make_mesh(*mesh_shape)
    n, s = cfg.data.global_batch, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size - 1, size=(n, s), dtype=np.int32)

    runs = {}
    for objective in ("tidar", "ar"):
        graphdef, params = create_sharded(mcfg, mesh, seed=0, remat=cfg.model.remat)
        fns = make_step_fns(graphdef, mcfg, params, mesh, cfg.optim, cfg.train.steps, objective, cfg.train.alpha)
        state = init_train_state(fns.tx, params, fns.state_shardings)
        batch = jax.device_put(tokens, fns.batch_sharding)
        t0 = time.perf_counter()
        state, m = fns.train_step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            state, m = fns.train_step(state, batch)
        jax.block_until_ready(m)
        runs[objective] = {"fns": fns, "state": state, "batch": batch, "times": [], "compile_s": compile_s}

    for _ in range(args.rounds):
        for objective in ("tidar", "ar"):
            r = runs[objective]
            t0 = time.perf_counter()
            r["state"], m = r["fns"].train_step(r["state"], r["batch"])
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)

    def summary(times):
        t = np.asarray(times)
        return {"median_s": float(np.median(t)), "p25_s": float(np.percentile(t, 25)), "min_s": float(t.min()),
                "tokens_per_s": float(n * s / np.median(t))}

    result = {
        "model": {"params_M": mcfg.num_params / 1e6, "hidden": mcfg.hidden_size, "layers": mcfg.num_layers,
                  "vocab": mcfg.vocab_size, "block_size": mcfg.block_size, "dtype": mcfg.dtype,
                  "remat": cfg.model.remat},
        "batch": n, "seq_len": s, "rounds": args.rounds, "mesh": list(mesh_shape),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "host": f"{platform.machine()} {os.cpu_count()} cpus", "grad_accum": cfg.optim.grad_accum,
        "tidar": {**summary(runs["tidar"]["times"]), "compile_s": runs["tidar"]["compile_s"]},
        "ar": {**summary(runs["ar"]["times"]), "compile_s": runs["ar"]["compile_s"]},
    }
    result["ratio_tidar_over_ar"] = result["tidar"]["median_s"] / result["ar"]["median_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = [
        "# Train step: TiDAR objective vs AR objective (same model, same S)",
        "",
        f"Model {result['model']['params_M']:.2f}M params (d={mcfg.hidden_size}, L={mcfg.num_layers}, "
        f"V={mcfg.vocab_size}, B={mcfg.block_size}, {mcfg.dtype}), batch {n} x S={s}, mesh {tuple(mesh_shape)} on "
        f"{result['devices']} ({result['host']}); {args.rounds} interleaved rounds.",
        "",
        "| objective | tokens through the model | median step (ms) | p25 (ms) | train tokens/s (clean S) |",
        "|---|---|---|---|---|",
        f"| TiDAR | 2S = {2 * s} | {result['tidar']['median_s'] * 1e3:.1f} | {result['tidar']['p25_s'] * 1e3:.1f} | "
        f"{result['tidar']['tokens_per_s']:,.0f} |",
        f"| AR | S = {s} | {result['ar']['median_s'] * 1e3:.1f} | {result['ar']['p25_s'] * 1e3:.1f} | "
        f"{result['ar']['tokens_per_s']:,.0f} |",
        "",
        f"**TiDAR / AR step-time ratio: {result['ratio_tidar_over_ar']:.2f}x** (median over median).",
        "",
    ]
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
