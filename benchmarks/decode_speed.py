#!/usr/bin/env python
"""Decode speed: AR vs TiDAR (B = 2, 4, 8, 16) at batch 1 and 4, interleaved, plus the selective LM-head saving.

    python benchmarks/decode_speed.py --checkpoint CKPT          # a real checkpoint
    python benchmarks/decode_speed.py                            # a RANDOM model (accepts ~nothing: T/NFE ~ 1)

Every configuration is compiled first; then rounds run all configurations in turn (interleaved), so machine
noise hits them alike, and ratios are taken between medians of the same run. Writes
``<out-dir>/decode_speed.json`` and ``<out-dir>/decode_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_ints(text):
    return [int(x) for x in text.split(",") if x]


def build_parser():
    p = argparse.ArgumentParser(description="AR vs TiDAR decode speed (interleaved)")
    p.add_argument("--checkpoint", help="checkpoint to load (default: a random model, clearly labelled)")
    p.add_argument("--block-sizes", default="2,4,8,16")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--vocab", type=int, default=8192, help="random model only")
    p.add_argument("--hidden", type=int, default=256, help="random model only")
    p.add_argument("--layers", type=int, default=4, help="random model only")
    p.add_argument("--seed", type=int, default=0)
    return p


def load(args):
    from tidar_jax.decode import Decoder

    if args.checkpoint:
        from tidar_jax.loading import load_for_inference

        bundle = load_for_inference(args.checkpoint)
        return Decoder.from_bundle(bundle, max_cache_len=1 << 20), f"checkpoint {os.path.abspath(args.checkpoint)}"
    from tidar_jax.config import ModelConfig
    from tidar_jax.model import init_model

    heads = max(args.hidden // 64, 1)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                      num_kv_heads=max(heads // 2, 1), mlp_size=3 * args.hidden, mask_token_id=args.vocab - 1)
    label = (f"RANDOM model (untrained: drafts are almost never accepted, so T/NFE ~ 1 and TiDAR cannot beat AR "
             f"here; this measures overheads) vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
             f"layers={cfg.num_layers} heads={cfg.num_heads}/{cfg.num_kv_heads}")
    return Decoder.from_model(init_model(cfg, args.seed), max_cache_len=1 << 20), label


def machine():
    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()][:1], "device_count": jax.device_count()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    import numpy as np

    dec, label = load(args)
    rng = np.random.default_rng(args.seed)
    vocab = dec.cfg.vocab_size
    mask_id = dec.cfg.mask_token_id
    configs = []  # (name, batch, kwargs)
    for n in parse_ints(args.batch_sizes):
        configs.append((f"AR N={n}", n, dict(mode="ar")))
        for b in parse_ints(args.block_sizes):
            common = dict(mode="tidar", block_size=b, allow_untrained_block_size=True)
            configs.append((f"TiDAR B={b} N={n}", n, common))
            configs.append((f"TiDAR B={b} N={n} full-head", n, dict(common, full_logits=True)))
    prompts = {}
    for n in parse_ints(args.batch_sizes):
        rows = []
        for i in range(n):
            ids = rng.integers(0, vocab, size=args.prompt_len - i).tolist()
            rows.append([t if t != mask_id else 0 for t in ids])
        prompts[n] = rows

    def run(n, kw):
        return dec.generate(prompts[n], max_new_tokens=args.max_new_tokens, eos_token_id=None, **kw)

    compile_s = {}
    for name, n, kw in configs:  # compile + warm every program before timing anything
        t0 = time.perf_counter()
        run(n, kw)
        compile_s[name] = time.perf_counter() - t0
    samples = {name: [] for name, _, _ in configs}
    for _ in range(args.rounds):
        for name, n, kw in configs:
            r = run(n, kw)
            samples[name].append(r.stats)

    rows = []
    for name, n, kw in configs:
        walls = [s["wall_s"] for s in samples[name]]
        st = samples[name][0]
        wall = statistics.median(walls)
        tokens = sum(st["new_tokens"])
        rows.append({"config": name, "batch": n, "mode": kw["mode"], "block_size": kw.get("block_size", 1),
                     "full_head": bool(kw.get("full_logits")), "median_wall_s": wall, "walls_s": walls,
                     "tokens": tokens, "tokens_per_s": tokens / wall, "nfe": st["nfe"],
                     "tokens_per_nfe": st["tokens_per_nfe"], "ms_per_forward": 1000 * wall / st["nfe"],
                     "accepted_length_hist": st["accepted_length_hist"], "compile_plus_first_run_s": compile_s[name]})
    by = {r["config"]: r for r in rows}
    for r in rows:
        ar = by[f"AR N={r['batch']}"]
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["speedup_over_tnfe"] = r["speedup_vs_ar"] / r["tokens_per_nfe"]
        if r["mode"] == "tidar" and not r["full_head"]:
            full = by[r["config"] + " full-head"]
            r["head_saving_step_ratio"] = full["ms_per_forward"] / r["ms_per_forward"]
    result = {"model": label, "machine": machine(), "max_new_tokens": args.max_new_tokens,
              "prompt_len": args.prompt_len, "rounds": args.rounds, "results": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "decode_speed.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = [f"# Decode speed: AR vs TiDAR", "", f"Model: {label}", "",
          f"Machine: {result['machine']}", "",
          f"max_new_tokens={args.max_new_tokens}, prompt_len={args.prompt_len} (row i: prompt_len - i), "
          f"{args.rounds} interleaved rounds, medians; greedy, beta=1, slot0=verifier; compile excluded.", "",
          "| config | tokens/s | T/NFE | speedup vs AR | speedup / T/NFE | ms/forward | full-head ms/forward "
          "÷ selective |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["full_head"]:
            continue
        saving = f"{r['head_saving_step_ratio']:.2f}x" if "head_saving_step_ratio" in r else "-"
        md.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_nfe']:.2f} | "
                  f"{r['speedup_vs_ar']:.2f}x | {r['speedup_over_tnfe']:.2f} | {r['ms_per_forward']:.2f} | {saving} |")
    with open(os.path.join(args.out_dir, "decode_speed.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
