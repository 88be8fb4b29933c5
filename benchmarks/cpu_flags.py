#!/usr/bin/env python
"""XLA CPU options vs the free-slot curve: forward latency at Q = 1, 4, 16 query tokens and the decode engine's
TiDAR step (B = 2, 4) relative to the engine's AR step, on a random model with the Qwen2.5-0.5B shape.

    python benchmarks/cpu_flags.py [--rounds 2] [--reps 5] [--layers 24] [--out benchmarks/results]

XLA_FLAGS only take effect at process start, so each candidate (flags x weight dtype) runs in its own worker
process; candidates are interleaved round-robin (A B C .. A B C ..) so machine drift hits them alike, and every
ratio (step / 1-token forward) is taken inside one worker run. Writes ``cpu_flags.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

from benchmarks import ROOT, cli  # noqa: E402

CANDIDATES = {  # name -> (extra XLA_FLAGS, decode dtype)
    "default": ("", "float32"),
    "onednn": ("--xla_cpu_use_onednn=true", "float32"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", "float32"),
    "no_eigen_threads": ("--xla_cpu_multi_thread_eigen=false", "float32"),
    "bf16_weights": ("", "bfloat16"),
}
QWEN05 = dict(vocab_size=151936, hidden_size=896, num_heads=14, num_kv_heads=2, mlp_size=4864,
              tie_embeddings=True, qkv_bias=True, family="qwen2", mask_token_id=151662, block_size=4)


def worker(args):
    import jax
    import jax.numpy as jnp
    from functools import partial

    from benchmarks import free_slots as fs

    from tidar_jax.config import ModelConfig
    from tidar_jax.decode import engine
    from tidar_jax.decode.api import cast_params
    from tidar_jax.decode.options import DecodeOptions
    from tidar_jax.model import abstract_model, create_sharded
    from tidar_jax.sharding import make_mesh

    cfg = ModelConfig(num_layers=args.layers, **QWEN05, dtype=args.dtype, param_dtype="float32")
    graphdef, params = create_sharded(cfg, make_mesh(devices=jax.devices()[:1]), seed=0)
    if args.dtype != "float32":
        cfg = cfg.replace(param_dtype=args.dtype)
        graphdef = abstract_model(cfg)[0]
        params = cast_params(params, jnp.dtype(args.dtype))
    context = args.context
    cands = {}
    for block in (1, 2, 4):
        opts = DecodeOptions(mode="ar" if block == 1 else "tidar", block_size=block, max_new_tokens=1 << 20)
        fn = jax.jit(partial(engine.step, graphdef, opts.validate()))
        cands[f"step_B{block}"] = partial(fn, params, fs.engine_state(cfg, context, block, opts, 0))
    fwd = jax.jit(partial(fs._forward, graphdef))
    import numpy as np
    rng = np.random.default_rng(0)
    cache = fs.random_cache(cfg, context, 0)
    for q in (1, 4, 16):
        inputs = [jnp.asarray(a) for a in fs.plain_inputs(cfg, context, q, rng)]
        cands[f"fwd_Q{q}"] = partial(fwd, params, cache, *inputs)
    for f in cands.values():  # compile + warm
        jax.block_until_ready(f())
    times = {k: [] for k in cands}
    for _ in range(args.reps):
        for k, f in cands.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    out = {k: min(v) * 1e3 for k, v in times.items()}
    out["load_average"] = list(os.getloadavg())
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_shared(p, "rounds", "reps", rounds=dict(default=2), reps=dict(default=5))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    cli.add_shared(p, "out", out=dict(default=os.path.join(ROOT, "benchmarks", "results")))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    names = [c for c in args.candidates.split(",") if c]
    bad = [c for c in names if c not in CANDIDATES]
    if bad:
        raise SystemExit(f"--candidates: unknown {bad[0]!r}; known: {', '.join(CANDIDATES)}")
    runs = {c: [] for c in names}
    for r in range(args.rounds):
        for c in names:
            flags, dtype = CANDIDATES[c]
            env = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_flags", "--worker", "--dtype", dtype,
                                   "--reps", str(args.reps), "--layers", str(args.layers),
                                   "--context", str(args.context)], env=env, cwd=ROOT, capture_output=True,
                                  text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                runs[c].append({"error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                runs[c].append(json.loads(line[0][7:]))
            print(f"round {r} {c}: {runs[c][-1]}", flush=True)
    table = {}
    for c, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            table[c] = {"error": rs[-1]["error"]}
            continue
        med = {k: statistics.median(x[k] for x in ok) for k in ok[0] if k != "load_average"}
        ratios = {f"{k}/fwd_Q1": statistics.median(x[k] / x["fwd_Q1"] for x in ok) for k in ok[0]
                  if k.startswith(("fwd_Q", "step_B")) and k != "fwd_Q1"}
        ratios.update({f"step_B{b}/step_B1": statistics.median(x[f"step_B{b}"] / x["step_B1"] for x in ok)
                       for b in (2, 4)})
        table[c] = {"min_ms_median_over_rounds": med, "ratios": ratios,
                    "load_averages": [x["load_average"] for x in ok]}
    result = {"benchmark": "cpu_flags", "model": f"random Qwen2.5-0.5B shape, {args.layers} layers, batch 1, "
              f"context {args.context}", "rounds": args.rounds, "reps": args.reps, "candidates": CANDIDATES,
              "results": table, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, ".cpu_flags.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "cpu_flags.json"))
    for c, t in table.items():
        if "error" in t:
            print(f"{c:18s} error: {t['error']}")
            continue
        m, r = t["min_ms_median_over_rounds"], t["ratios"]
        print(f"{c:18s} fwd Q1 {m['fwd_Q1']:7.1f} ms  Q4 {r['fwd_Q4/fwd_Q1']:.2f}x  Q16 {r['fwd_Q16/fwd_Q1']:.2f}x  "
              f"AR step {m['step_B1']:7.1f} ms  TiDAR B2 {r['step_B2/step_B1']:.2f}x  B4 {r['step_B4/step_B1']:.2f}x")
    return result


if __name__ == "__main__":
    main()
