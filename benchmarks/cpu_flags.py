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


STEPS = {  # name -> (block size, mask-group counts or None = all, head strategy); B=1 is the AR step
    "step_B1": (1, None, "selective"),
    "step_B2_selective": (2, None, "selective"), "step_B2_one_pass": (2, None, "one_pass"),
    "step_B4_selective": (4, None, "selective"), "step_B4_one_pass": (4, None, "one_pass"),
    "step_B4_G2_one_pass": (4, (1, 2), "one_pass"), "step_B4_G1_one_pass": (4, (1,), "one_pass"),
}
FORWARD_Q = (1, 2, 4, 6, 8, 12, 20)  # 6 = B(B+1) at B=2, 20 at B=4, 12 / 8: B=4 with 2 / 1 mask groups


def step_queries(name: str) -> int:
    """Query tokens of a step: B drafts + B per mask group."""
    block, counts, _ = STEPS[name]
    if block == 1:
        return 1
    return block * (1 + (block if counts is None else len(counts)))


def worker(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from functools import partial

    from benchmarks import bench_common as bc
    from benchmarks import free_slots as fs

    from tidar_jax import masks
    from tidar_jax.config import ModelConfig
    from tidar_jax.decode import engine
    from tidar_jax.decode.api import cast_params
    from tidar_jax.decode.options import DecodeOptions
    from tidar_jax.model import abstract_model, create_sharded, layer_major
    from tidar_jax.sharding import make_mesh

    cfg = ModelConfig(num_layers=args.layers, **QWEN05, dtype=args.dtype, param_dtype="float32")
    graphdef, params = create_sharded(cfg, make_mesh(devices=jax.devices()[:1]), seed=0)
    if args.dtype != "float32":
        cfg = cfg.replace(param_dtype=args.dtype)
        graphdef = abstract_model(cfg)[0]
        params = cast_params(params, jnp.dtype(args.dtype))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    params = layer_major.to_layer_major(params)  # the layout the decoder runs: one buffer per layer
    context = args.context
    cands = {}

    for name, (block, counts, head) in STEPS.items():
        opts = DecodeOptions(mode="ar" if block == 1 else "tidar", block_size=block, max_new_tokens=1 << 20,
                             groups=counts, head=head).validate()
        fn = jax.jit(partial(engine.step, graphdef, opts), donate_argnums=(1,))
        cands[name] = bc.DonatedStepper(fn, params, fs.engine_state(cfg, context, block, opts, 0))

    def plain_forward(params, cache, tokens_1Q, length_1):
        """A plain causal forward of Q tokens over the cache (the decode engine's cache path), logits at every row."""
        model = layer_major.merge(graphdef, params)
        layout = masks.decode_attention_layout(length_1, tokens_1Q.shape[1], cache.k_LNCKD.shape[2], groups=False,
                                               cache_page=128)
        hidden_1QD, _ = model.hidden(tokens_1Q, layout.positions(), layout, cache)
        return model.logits(hidden_1QD)

    fwd = jax.jit(plain_forward)
    rng = np.random.default_rng(0)
    cache = fs.random_cache(cfg, context, 0)
    for q in FORWARD_Q:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, q)), jnp.int32)
        cands[f"fwd_Q{q}"] = partial(fwd, params, cache, tokens, jnp.full((1,), context, jnp.int32))

    # memory bandwidth of this process, for the weight-read bound of the 1-token forward / AR step
    big = jnp.ones((args.bandwidth_mib << 20) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    cands["read_bw"] = partial(total, big)
    bump = jax.jit(lambda x: x + 1, donate_argnums=0)  # in place: read + write every byte once
    copy_buf = [bump(jnp.ones_like(big))]

    def copy_step():
        copy_buf[0] = bump(copy_buf[0])
        return copy_buf[0]

    cands["copy_bw"] = copy_step
    for f in cands.values():  # compile + warm
        jax.block_until_ready(f())
    times = {k: [] for k in cands}
    for _ in range(args.reps):
        for k, f in cands.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    out = {k: min(v) * 1e3 for k, v in times.items() if not k.endswith("_bw")}
    out["read_gb_s"] = big.nbytes / min(times["read_bw"]) / 1e9
    out["copy_gb_s"] = 2 * big.nbytes / min(times["copy_bw"]) / 1e9
    out["weight_bytes"] = weight_bytes
    if args.capture:
        out["capture"] = capture(cfg, graphdef, params, out, args)
    out["load_average"] = list(os.getloadavg())
    print("RESULT " + json.dumps(out), flush=True)


CAPTURE = {  # generate() configurations -> the engine step (of STEPS) whose cost predicts them
    "ar": (dict(mode="ar"), "step_B1"),
    "B2_one_pass": (dict(mode="tidar", block_size=2, head="one_pass"), "step_B2_one_pass"),
    "B2_selective": (dict(mode="tidar", block_size=2, head="selective"), "step_B2_selective"),
    "B4_G1_one_pass": (dict(mode="tidar", block_size=4, groups=(1,), head="one_pass"), "step_B4_G1_one_pass"),
}


def capture(cfg, graphdef, params, step_ms, args) -> dict:
    """Does the engine capture what the hardware and the drafts allow? Greedy lossless generation through
    ``Decoder.generate`` (compile excluded), AR and TiDAR interleaved over rounds; predicted speedup =
    T/NFE x t(AR step) / t(TiDAR step) from this worker's step timings; capture = measured / predicted."""
    import numpy as np

    from tidar_jax.decode import Decoder

    dec = Decoder(cfg, graphdef, params, eos_token_id=None)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(2, cfg.vocab_size, args.capture_prompt)]
    kw = dict(max_new_tokens=args.capture_tokens, eos_token_id=None)
    for options, _ in CAPTURE.values():  # compile (reported separately by generate, never in wall_s)
        dec.generate([prompt], **options, **kw)
    stats = {name: [] for name in CAPTURE}
    tokens = {}
    for _ in range(args.capture_rounds):
        for name, (options, _) in CAPTURE.items():
            res = dec.generate([prompt], **options, **kw)
            stats[name].append(res.stats)
            tokens[name] = res.tokens[0]
    wall = {name: statistics.median(s["wall_s"] for s in runs) for name, runs in stats.items()}
    out = {"prompt_tokens": args.capture_prompt, "new_tokens": args.capture_tokens,
           "lossless_equal_ar": {name: tokens[name] == tokens["ar"] for name in CAPTURE}}
    for name, (_, step) in CAPTURE.items():
        tpnfe = stats[name][0]["tokens_per_nfe"]
        speedup = wall["ar"] / wall[name]
        predicted = tpnfe * step_ms["step_B1"] / step_ms[step]
        out[name] = {"wall_s": wall[name], "tokens_per_s": args.capture_tokens / wall[name],
                     "tokens_per_nfe": tpnfe, "speedup_vs_ar": speedup, "predicted_speedup": predicted,
                     "capture": speedup / predicted}
    return out


def summarise(runs: list[dict]) -> dict:
    """Medians over rounds of the per-run minima and of ratios taken inside one worker run: each step and forward
    over the 1-token forward, each step over a plain forward of as many query tokens (the engine's overhead), and
    the 1-token forward / AR step over the weight-read bound (weight bytes / read bandwidth of that run)."""
    med = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k not in ("load_average", "capture")}
    ratios = {}
    for k in runs[0]:
        if k.startswith(("fwd_Q", "step_")) and k != "fwd_Q1":
            ratios[f"{k}/fwd_Q1"] = statistics.median(x[k] / x["fwd_Q1"] for x in runs)
    for k in STEPS:
        ratios[f"{k}/fwd_same_Q"] = statistics.median(x[k] / x[f"fwd_Q{step_queries(k)}"] for x in runs)
    for k in ("fwd_Q1", "step_B1"):  # bound = weight bytes / bandwidth (read-only sum, and copy as bandwidth.py)
        for bw in ("read", "copy"):
            ratios[f"{k}/weight_{bw}_bw_bound"] = statistics.median(
                x[k] / (x["weight_bytes"] / (x[f"{bw}_gb_s"] * 1e9) * 1e3) for x in runs)
    out = {"min_ms_median_over_rounds": med, "ratios": ratios, "load_averages": [x["load_average"] for x in runs]}
    if any("capture" in x for x in runs):
        out["capture"] = [x["capture"] for x in runs if "capture" in x]
    return out


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_shared(p, "rounds", "reps", rounds=dict(default=2), reps=dict(default=5))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    cli.add_shared(p, "out", out=dict(default=os.path.join(ROOT, "benchmarks", "results")))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--capture", action="store_true",
                   help="also time greedy generation (AR vs TiDAR) in the first candidate's workers")
    p.add_argument("--capture-prompt", type=int, default=8)
    p.add_argument("--capture-tokens", type=int, default=64)
    p.add_argument("--capture-rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cli.require_positive(args, ("rounds", "reps", "layers", "context", "bandwidth_mib", "capture_prompt",
                                "capture_tokens", "capture_rounds"))
    if args.worker:
        return worker(args)
    names = [c for c in args.candidates.split(",") if c]
    bad = [c for c in names if c not in CANDIDATES]
    if bad:
        raise SystemExit(f"--candidates: unknown {bad[0]!r}; known: {', '.join(CANDIDATES)}")
    capture_args = ["--capture", "--capture-prompt", str(args.capture_prompt), "--capture-tokens",
                    str(args.capture_tokens), "--capture-rounds", str(args.capture_rounds)]
    runs = {c: [] for c in names}
    for r in range(args.rounds):
        for c in names:
            flags, dtype = CANDIDATES[c]
            env = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_flags", "--worker", "--dtype", dtype,
                                   "--reps", str(args.reps), "--layers", str(args.layers),
                                   "--context", str(args.context), "--bandwidth-mib", str(args.bandwidth_mib)]
                                  + (capture_args if args.capture and c == names[0] else []),
                                  env=env, cwd=ROOT, capture_output=True, text=True)
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
        table[c] = summarise(ok)
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
        print(f"{c:18s} fwd Q1 {m['fwd_Q1']:6.1f} ms ({r['fwd_Q1/weight_read_bw_bound']:.2f}x read / {r['fwd_Q1/weight_copy_bw_bound']:.2f}x copy bound)  "
              + "  ".join(f"Q{q} {r[f'fwd_Q{q}/fwd_Q1']:.2f}x" for q in FORWARD_Q[1:]))
        for cap in t.get("capture", []):
            print(f"{'':18s} generate: " + "  ".join(
                f"{k} {v['tokens_per_s']:.1f} tok/s T/NFE {v['tokens_per_nfe']:.2f} speedup {v['speedup_vs_ar']:.2f}x "
                f"(predicted {v['predicted_speedup']:.2f}x, capture {v['capture']:.2f})"
                for k, v in cap.items() if isinstance(v, dict) and k != "lossless_equal_ar"))
        print(f"{'':18s} AR step {m['step_B1']:6.1f} ms ({r['step_B1/weight_read_bw_bound']:.2f}x read / {r['step_B1/weight_copy_bw_bound']:.2f}x copy bound)  "
              + "  ".join(f"{k[5:]} {r[f'{k}/fwd_Q1']:.2f}x|{r[f'{k}/fwd_same_Q']:.2f}" for k in STEPS
                          if k != "step_B1"))
    return result


if __name__ == "__main__":
    main()
