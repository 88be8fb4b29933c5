#!/usr/bin/env python
"""Decode speed: AR vs TiDAR (B = 2, 4, 8, 16) at batch 1 and 4, interleaved; ``--toy-train-steps`` first trains
a small model on patterned sequences so that drafts are accepted.

    python -m benchmarks.decode_speed --checkpoint CKPT          # a real checkpoint
    python -m benchmarks.decode_speed                            # a RANDOM model (accepts ~nothing: T/NFE ~ 1)

Every configuration is compiled first; then rounds run all configurations in turn (interleaved), so machine
noise hits them alike, and ratios are taken between medians of the same run. Writes
``<out-dir>/decode_speed.json`` and ``<out-dir>/decode_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from benchmarks import ROOT, cli
from benchmarks import common as bc


def parse_ints(text):
    return [int(x) for x in text.split(",") if x]


def build_parser():
    p = argparse.ArgumentParser(description="AR vs TiDAR decode speed (interleaved)")
    cli.add_shared(p, "checkpoint", checkpoint=dict(help="checkpoint to load (default: a random model, clearly "
                                                         "labelled)"))
    p.add_argument("--block-sizes", default="2,4,8,16")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-new-tokens", type=int, default=64)
    cli.add_shared(p, "prompt_len", "rounds", prompt_len=dict(default=32), rounds=dict(default=5))
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--out-name", default="decode_speed", help="results file stem")
    p.add_argument("--vocab", type=int, default=8192, help="random model only")
    p.add_argument("--hidden", type=int, default=256, help="random model only")
    p.add_argument("--layers", type=int, default=4, help="random model only")
    cli.add_shared(p, "seed")
    p.add_argument("--toy-train-steps", type=int, default=0,
                   help="instead of a random model, train one for this many steps on arithmetic sequences "
                        "(x_{i+1} = x_i + s mod V-1) so that drafts are accepted; prompts come from the same law")
    return p


def toy_sequences(rng, n, length, vocab):
    """Arithmetic sequences mod vocab-1 (the last id is the mask): x_{i+1} = x_i + s, s in 1..3."""
    start = rng.integers(0, vocab - 1, size=(n, 1))
    stride = rng.integers(1, 4, size=(n, 1))
    return ((start + stride * np.arange(length)[None]) % (vocab - 1)).astype(np.int32)


def toy_train(cfg, steps, seed, seq=64, batch=16):
    """A few hundred steps of the TiDAR objective on ``toy_sequences``; returns the trained nnx model."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from tidar_jax import masks
    from tidar_jax.model import init_model
    from tidar_jax.objective import tidar_loss

    model = init_model(cfg, seed)
    graphdef, state = nnx.split(model)
    mask = jnp.broadcast_to(masks.training_mask(seq, cfg.block_size), (batch, 2 * seq, 2 * seq))
    pos = jnp.broadcast_to(masks.training_positions(seq), (batch, 2 * seq))
    tx = optax.adam(2e-3)
    opt = tx.init(state)

    @jax.jit
    def step(st, op, toks):
        def loss_fn(st_):
            inp = jnp.concatenate([toks, jnp.full_like(toks, cfg.mask_token_id)], axis=1)
            return tidar_loss(nnx.merge(graphdef, st_)(inp, pos, mask)[0], toks)[0]
        loss, g = jax.value_and_grad(loss_fn)(st)
        upd, op = tx.update(g, op, st)
        return optax.apply_updates(st, upd), op, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        state, opt, loss = step(state, opt, jnp.asarray(toy_sequences(rng, batch, seq, cfg.vocab_size)))
    print(f"toy training: {steps} steps, final loss {float(loss):.3f}", file=sys.stderr)
    nnx.update(model, state)
    return model


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
                      num_kv_heads=max(heads // 2, 1), mlp_size=3 * args.hidden, mask_token_id=args.vocab - 1,
                      block_size=4)
    if args.toy_train_steps:
        label = (f"TOY model trained {args.toy_train_steps} steps (TiDAR loss, block 4) on arithmetic sequences, "
                 f"prompts from the same law: an easy task, so acceptance is far higher than on real text; "
                 f"vocab={cfg.vocab_size} hidden={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads}/"
                 f"{cfg.num_kv_heads}")
        return Decoder.from_model(toy_train(cfg, args.toy_train_steps, args.seed), max_cache_len=1 << 20), label
    label = (f"RANDOM model (untrained: drafts are almost never accepted, so T/NFE ~ 1 and TiDAR cannot beat AR "
             f"here; this measures overheads) vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
             f"layers={cfg.num_layers} heads={cfg.num_heads}/{cfg.num_kv_heads}")
    return Decoder.from_model(init_model(cfg, args.seed), max_cache_len=1 << 20), label


def main(argv=None):
    args = build_parser().parse_args(argv)
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
    prompts = {}
    for n in parse_ints(args.batch_sizes):
        rows = []
        for i in range(n):
            if args.toy_train_steps:
                ids = toy_sequences(rng, 1, args.prompt_len - i, vocab)[0].tolist()
            else:
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
                     "median_wall_s": wall, "walls_s": walls,
                     "tokens": tokens, "tokens_per_s": tokens / wall, "nfe": st["nfe"],
                     "tokens_per_nfe": st["tokens_per_nfe"], "ms_per_forward": 1000 * wall / st["nfe"],
                     "accepted_length_hist": st["accepted_length_hist"], "compile_plus_first_run_s": compile_s[name]})
    by = {r["config"]: r for r in rows}
    for r in rows:
        ar = by[f"AR N={r['batch']}"]
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["speedup_over_tnfe"] = r["speedup_vs_ar"] / r["tokens_per_nfe"]
    result = {"model": label, "machine": bc.machine_info(), "max_new_tokens": args.max_new_tokens,
              "prompt_len": args.prompt_len, "rounds": args.rounds, "results": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    bc.write_json(os.path.join(args.out_dir, args.out_name + ".json"), result)
    md = ["# Decode speed: AR vs TiDAR", "", f"Model: {label}", "",
          f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_threads']} CPUs", "",
          f"max_new_tokens={args.max_new_tokens}, prompt_len={args.prompt_len} (row i: prompt_len - i), "
          f"{args.rounds} interleaved rounds, medians; greedy, beta=1, slot0=verifier; compile excluded.", "",
          "| config | tokens/s | T/NFE | speedup vs AR | speedup / T/NFE | ms/forward |", "|---|---|---|---|---|---|"]
    md += [f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_nfe']:.2f} | {r['speedup_vs_ar']:.2f}x | "
           f"{r['speedup_over_tnfe']:.2f} | {r['ms_per_forward']:.2f} |" for r in rows]
    bc.write_text(os.path.join(args.out_dir, args.out_name + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
