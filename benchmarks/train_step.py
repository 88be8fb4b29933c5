#!/usr/bin/env python
"""Train-step time of the TiDAR objective (doubled 2S sequence) vs a plain AR objective (S) on the same model.

Both steps are compiled first, then timed interleaved (TiDAR, AR, TiDAR, AR, ...) so machine noise hits both
alike; the ratio comes from one run.  Writes ``benchmarks/results/train_step.{json,md}``.

    python -m benchmarks.train_step                       # the tiny preset's model, batch and S
    python -m benchmarks.train_step --rounds 5 model.num_layers=1 data.seq_len=32   # smoke size

Kernel sweep (``--kernels``): for each S of ``--seq-lens``, every (kernel, objective) candidate is compiled, then
all are timed interleaved round by round; ``blockwise@256`` names the blockwise kernel with 256x256 tiles. Also
reports the fraction of attention tiles the blockwise kernel visits. Writes ``train_step_kernels.{json,md}``:

    python -m benchmarks.train_step --kernels reference,blockwise --seq-lens 512,1024,2048 --rounds 3 \
        model.hidden_size=128 model.num_layers=2 model.num_heads=4 model.num_kv_heads=2 model.mlp_size=384 \
        model.vocab_size=256 model.block_size=16 data.global_batch=1 mesh.data=1
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

from benchmarks import ROOT, cli
from tidar_jax.checkpoint import atomic


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    cli.add_shared(p, "rounds", rounds=dict(default=20, help="timed (TiDAR, AR) pairs after warm-up"))
    p.add_argument("--vocab-size", type=int, default=None, help="model vocab (default: model.vocab_size)")
    cli.add_shared(p, "out", out=dict(default=os.path.join(ROOT, "benchmarks", "results")))
    p.add_argument("--kernels", default=None,
                   help="comma list of attention kernels to compare (e.g. reference,blockwise,blockwise@256)")
    p.add_argument("--seq-lens", default=None, help="comma list of S for --kernels (default: data.seq_len)")
    p.add_argument("--tag", default="", help="--kernels results go to train_step_kernels[_TAG].{json,md}")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cli.require_positive(args, ("rounds",))
    if args.kernels is not None:
        return kernel_sweep(args)

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


def _parse_kernel(name: str):
    """``kernel`` or ``blockwise@TILE`` -> (kernel, tile or None)."""
    from tidar_jax.config import ATTENTION_KERNELS
    kernel, _, tile = name.partition("@")
    if kernel not in ATTENTION_KERNELS or (tile and (kernel != "blockwise" or not tile.isdigit() or int(tile) < 1)):
        raise SystemExit(f"--kernels entry {name!r}: must be one of {', '.join(ATTENTION_KERNELS)} "
                         "or blockwise@TILE (TILE a positive int)")
    return kernel, (int(tile) if tile else None)


def _positive_ints(text: str, flag: str):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = [0]
    if not values or min(values) < 1:
        raise SystemExit(f"{flag}={text!r}: must be a comma list of positive integers")
    return values


def _tile_fractions(seq_len: int, block_size: int, tile: int):
    from tidar_jax import masks
    from tidar_jax.attention import blockwise
    tidar = blockwise.schedule_for(masks.training_layout(seq_len, block_size), 2 * seq_len, 2 * seq_len, tile, tile)
    causal = blockwise.schedule_for(masks.causal_layout(seq_len), seq_len, seq_len, tile, tile)
    return tidar.visited_fraction, causal.visited_fraction


def kernel_sweep(args) -> int:
    """TiDAR and AR train steps per (kernel, S), interleaved; ratios from the same rounds."""
    import jax

    from tidar_jax.attention import blockwise
    from tidar_jax.config import ConfigError
    from tidar_jax.model.functional import create_sharded
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import load_config
    from tidar_jax.train.distributed import resolve_mesh_shape
    from tidar_jax.train.step import init_train_state, make_step_fns

    kernels = [_parse_kernel(k) for k in args.kernels.split(",")]
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    seq_lens = _positive_ints(args.seq_lens, "--seq-lens") if args.seq_lens else [base.data.seq_len]
    mesh_shape = resolve_mesh_shape(base.mesh, jax.device_count())
    mesh = make_mesh(*mesh_shape)
    load_before = os.getloadavg()
    rows = []

    def write(final):
        result = {
            "model": {"params_M": mcfg.num_params / 1e6, "hidden": mcfg.hidden_size, "layers": mcfg.num_layers,
                      "heads": mcfg.num_heads, "kv_heads": mcfg.num_kv_heads, "vocab": mcfg.vocab_size,
                      "block_size": mcfg.block_size, "dtype": mcfg.dtype, "remat": cfg.model.remat},
            "batch": cfg.data.global_batch, "rounds": args.rounds, "mesh": list(mesh_shape),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "host": f"{platform.machine()} {os.cpu_count()} cpus",
            "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
            "argv": sys.argv[1:], "rows": rows,
        }
        os.makedirs(args.out, exist_ok=True)
        md = [
            "# Train step per attention kernel: TiDAR objective (2S) vs AR objective (S)",
            "",
            f"Model {result['model']['params_M']:.2f}M params (d={mcfg.hidden_size}, L={mcfg.num_layers}, "
            f"H={mcfg.num_heads}/{mcfg.num_kv_heads}, V={mcfg.vocab_size}, B={mcfg.block_size}, {mcfg.dtype}), batch "
            f"{cfg.data.global_batch}, {result['devices']} ({result['host']}); {args.rounds} interleaved rounds per S "
            f"(all candidates of one S alternate). Load average before/after: "
            f"{', '.join(f'{x:.1f}' for x in load_before)} / "
            f"{', '.join(f'{x:.1f}' for x in result['load_avg_after'])}.",
            "",
            "| S | kernel | TiDAR step (ms) | AR step (ms) | TiDAR / AR | TiDAR tokens/s | AR tokens/s | "
            "tiles visited TiDAR / AR |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            frac = (f"{100 * r['tiles_visited_tidar']:.1f}% / {100 * r['tiles_visited_ar']:.1f}%"
                    if r["tile"] else "100% / 100% (dense)")
            md.append(f"| {r['seq_len']} | {r['kernel']} | {r['tidar']['median_s'] * 1e3:.0f} | "
                      f"{r['ar']['median_s'] * 1e3:.0f} | **{r['ratio_tidar_over_ar']:.2f}x** | "
                      f"{r['tidar']['tokens_per_s']:,.0f} | {r['ar']['tokens_per_s']:,.0f} | {frac} |")
        md += ["", "Medians over the rounds; tokens/s counts the S clean tokens of each sequence for both objectives.",
               "Command: `python -m benchmarks.train_step " + " ".join(sys.argv[1:]) + "`", ""]
        stem = "train_step_kernels" + (f"_{args.tag}" if args.tag else "")
        for name, text in ((stem + ".json", json.dumps(result, indent=2)), (stem + ".md", "\n".join(md))):
            atomic.write_text(os.path.join(args.out, name), text)
        if final:
            print("\n".join(md))

    for s in seq_lens:
        try:
            cfg = load_config(args.config, args.overrides + [f"data.seq_len={s}"])
            mcfg = cfg.model_config(mask_token_id=(cfg.model.arch.get("vocab_size") or 512) - 1)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        n = cfg.data.global_batch
        tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size - 1, size=(n, s), dtype=np.int32)
        cands = []
        for kernel, tile in kernels:
            kcfg = dataclasses.replace(mcfg, attention=kernel)
            for objective in ("tidar", "ar"):
                graphdef, params = create_sharded(kcfg, mesh, seed=0, remat=cfg.model.remat)
                fns = make_step_fns(graphdef, kcfg, params, mesh, cfg.optim, cfg.train.steps, objective,
                                    cfg.train.alpha)
                state = init_train_state(fns.tx, params, fns.state_shardings)
                batch = jax.device_put(tokens, fns.batch_sharding)
                saved = (blockwise.TILE_Q, blockwise.TILE_K)
                if tile:  # the blockwise tile is read at trace time, i.e. during this first (compiling) call
                    blockwise.TILE_Q = blockwise.TILE_K = tile
                try:
                    t0 = time.perf_counter()
                    state, m = fns.train_step(state, batch)
                    jax.block_until_ready(m)
                    compile_s = time.perf_counter() - t0
                finally:
                    blockwise.TILE_Q, blockwise.TILE_K = saved
                state, m = fns.train_step(state, batch)  # warm-up
                jax.block_until_ready(m)
                cands.append({"kernel": kernel, "tile": tile, "objective": objective, "fns": fns, "state": state,
                              "batch": batch, "times": [], "compile_s": compile_s})
        for _ in range(args.rounds):
            for c in cands:
                t0 = time.perf_counter()
                c["state"], m = c["fns"].train_step(c["state"], c["batch"])
                jax.block_until_ready(m)
                c["times"].append(time.perf_counter() - t0)
        by_kernel = {}
        for c in cands:
            med = float(np.median(c["times"]))
            by_kernel.setdefault((c["kernel"], c["tile"]), {})[c["objective"]] = {
                "median_s": med, "min_s": float(np.min(c["times"])), "tokens_per_s": n * s / med,
                "compile_s": c["compile_s"]}
        for (kernel, tile), r in by_kernel.items():
            t = tile or blockwise.TILE_Q
            frac_tidar, frac_causal = _tile_fractions(s, mcfg.block_size, t) if kernel == "blockwise" else (1.0, 1.0)
            rows.append({"seq_len": s, "kernel": kernel if not tile else f"{kernel}@{tile}",
                         "tile": t if kernel == "blockwise" else None, "tidar": r["tidar"], "ar": r["ar"],
                         "ratio_tidar_over_ar": r["tidar"]["median_s"] / r["ar"]["median_s"],
                         "tiles_visited_tidar": frac_tidar, "tiles_visited_ar": frac_causal})
        print(f"S={s} done: " + ", ".join(f"{r['kernel']} {r['ratio_tidar_over_ar']:.2f}x"
                                          for r in rows if r["seq_len"] == s), flush=True)
        write(final=False)
    write(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
