"""Free-token-slot profiler: forward latency vs number of query tokens at several context lengths, and the draft
block size that maximises expected tokens/s for a given checkpoint.

    python -m benchmarks.free_slots --checkpoint RUN_DIR [--quick] [--out benchmarks/results]

What is timed (batch 1, ``jax.jit`` over the params state, interleaved round-robin after a warm-up):
  * "plain" rows: one forward over ``[KV cache filled to L | Q new tokens]`` (cache fully visible, causal among the
    Q tokens), LM head on all Q rows -- the generic "how much do extra query tokens cost" curve.
  * "tidar_step" rows: exactly the decode engine's step forward for block size B: Q = B(B+1) tokens (B drafts + B
    mask groups of B) with the TiDAR decode mask and positions, LM head only on the 2B rows the engine uses
    (3B when beta < 1).
  * "engine_step" rows (``--groups-grid``): the decode engine's own jitted step (``engine.step``: forward, LM head
    by the chosen strategy, verification, cache write, emission) for each (B, G groups, head strategy).
Recommendation: for each B, expected tokens/s = E[accepted per step] / step latency, with E[accepted] measured by
running greedy TiDAR decode of the checkpoint on held-out prompts; the AR baseline is 1 / latency(Q=1).
With ``--groups-grid`` it also chooses (B, groups, head): for each B and G the covered counts are the G most
frequent accepted counts of the all-groups run, E[accepted] is measured again by decoding with exactly those
groups (fallback drafts are weaker, so the histogram alone would overestimate), and the cost is the measured
engine step; ``decode.py --recommendation free_slots.json`` then decodes with the winner.
Writes ``free_slots.csv`` (one row per timed forward), ``free_slots.json`` and ``free_slots.png``.
"""

from __future__ import annotations

import os
from functools import partial

from benchmarks import common as bc
from benchmarks import cli

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.decode import engine
from tidar_jax.decode.options import DecodeOptions
from tidar_jax.model import KVCache, layer_major

DEFAULTS = {"contexts": "256,1024,4096", "max_query": 512, "blocks": "2,4,8,16", "rounds": 15, "preset": "m38",
            "prompts": 4, "new_tokens": 64, "prompt_len": 64}
QUICK = {"contexts": "64,256", "max_query": 64, "blocks": "2,4,8", "rounds": 5, "preset": "small",
         "prompts": 2, "new_tokens": 24, "prompt_len": 32}
TINY = {"contexts": "16", "max_query": 2, "blocks": "2", "rounds": 2, "preset": "tiny", "prompts": 1,
        "new_tokens": 6, "prompt_len": 8}  # smoke tests only


query_grid = bc.query_grid  # the curve's x axis, shared with the accelerator suite


def build_candidates(bundle, contexts, queries, blocks, beta, seed):
    """name -> (zero-arg callable, row description) for every timed forward."""
    cfg = bundle.config
    fwd = jax.jit(partial(bc.forward, bundle.graphdef))
    decode_params = layer_major.to_layer_major(bundle.params)  # the layout the decoder runs
    rng = np.random.default_rng(seed)
    cands, meta = {}, {}
    for context in contexts:
        cache = bc.random_cache(cfg, 1, context, seed)
        specs = [("plain", q, None, bc.plain_inputs(cfg, 1, context, q, rng)) for q in queries]
        specs += [("tidar_step", b * (b + 1), b, bc.step_inputs(cfg, 1, context, b, rng, beta)) for b in blocks]
        for kind, q, block, inputs in specs:
            args = [jnp.asarray(a) for a in inputs]
            name = f"{kind}/L={context}/Q={q}"
            cands[name] = partial(fwd, decode_params, cache, *args)
            meta[name] = {"kind": kind, "context": context, "query_tokens": q, "block_size": block or "",
                          "head_rows": int(args[3].shape[1])}
    return cands, meta


HEADS = ("selective", "one_pass")


def group_grid(block: int) -> list[int]:
    """G = 1, 2, 4, ... < B, and B itself."""
    return [g for g in query_grid(block) if g < block] + [block]


def engine_state(cfg, context: int, block: int, opts: DecodeOptions, seed: int):
    """A decode state with ``context`` committed slots (random K/V; the values do not change the cost), room for
    the step's writes, and random pending drafts."""
    size = context + block
    shape = (cfg.num_layers, 1, size, cfg.num_kv_heads, cfg.head_dim)
    kk, kv, kd = jax.random.split(jax.random.key(seed), 3)
    dt = jnp.dtype(cfg.dtype)
    cache = KVCache(jax.random.normal(kk, shape, dt), jax.random.normal(kv, shape, dt),
                    jnp.full((1,), context, jnp.int32))
    drafts = jax.random.randint(kd, (1, block), 0, cfg.vocab_size).astype(jnp.int32)
    drafts = jnp.where(drafts == cfg.mask_token_id, 0, drafts)
    stops = engine.Stops(jnp.full((8,), -1, jnp.int32), jnp.full((8, 16), -1, jnp.int32), jnp.zeros((8,), jnp.int32))
    return engine._initial_state(cache, drafts, jax.random.key(seed), stops, opts)


def engine_candidates(bundle, contexts, blocks, beta, seed):
    """name -> callable timing ``engine.step`` for every (context, B, G = 1..B grid, head)."""
    cfg = bundle.config
    cands, meta = {}, {}
    params = layer_major.to_layer_major(bundle.params)  # the layout the decoder runs
    ar_opts = DecodeOptions(mode="ar", block_size=1, max_new_tokens=1 << 20).validate()
    ar_fn = jax.jit(partial(engine.step, bundle.graphdef, ar_opts))
    for context in contexts:  # the engine's AR step: the baseline the engine's TiDAR step is compared with
        name = f"engine_step/L={context}/AR"
        cands[name] = partial(ar_fn, params, engine_state(cfg, context, 1, ar_opts, seed))
        meta[name] = {"kind": "engine_step", "context": context, "query_tokens": 1, "block_size": 1, "groups": 0,
                      "head": "ar", "head_rows": ""}
    for block in blocks:
        for g in group_grid(block):
            for head in HEADS:
                groups = None if g == block else tuple(range(1, g + 1))
                opts = DecodeOptions(mode="tidar", block_size=block, beta=beta, head=head, groups=groups,
                                     max_new_tokens=1 << 20).validate()
                fn = jax.jit(partial(engine.step, bundle.graphdef, opts))
                for context in contexts:
                    name = f"engine_step/L={context}/B={block}/G={g}/{head}"
                    cands[name] = partial(fn, params, engine_state(cfg, context, block, opts, seed))
                    meta[name] = {"kind": "engine_step", "context": context, "query_tokens": block * (g + 1),
                                  "block_size": block, "groups": g, "head": head, "head_rows": ""}
    return cands, meta


def likely_counts(hist: dict, block: int, g: int) -> tuple[int, ...]:
    """The g most frequent accepted counts (ties: the smaller count), sorted."""
    freq = {k: int(hist.get(str(k), 0)) for k in range(1, block + 1)}
    return tuple(sorted(sorted(freq, key=lambda k: (-freq[k], k))[:g]))


def measure_group_acceptance(bundle, blocks, full_acceptance, prompts, new_tokens, beta, slot0="verifier"):
    """(B, G) -> {"groups": counts, "mean_accepted": ...} by decoding with exactly those groups."""
    from tidar_jax.decode import Decoder

    dec = Decoder.from_bundle(bundle)
    out = {}
    for b in blocks:
        for g in group_grid(b):
            counts = likely_counts(full_acceptance[b]["accepted_length_hist"], b, g)
            if g == b:
                out[(b, g)] = {"groups": list(counts), **full_acceptance[b]}
                continue
            res = dec.generate(prompts, mode="tidar", block_size=b, beta=beta, slot0=slot0, groups=counts,
                               max_new_tokens=new_tokens, eos_token_id=None, allow_untrained_block_size=True)
            s = res.stats
            out[(b, g)] = {"groups": list(counts), "mean_accepted": s["mean_accepted"],
                           "tokens_per_nfe": s["tokens_per_nfe"], "accepted_length_hist": s["accepted_length_hist"]}
    return out


def recommend_groups(latency_ms, group_acceptance, contexts):
    """Per context, expected tokens/s of every (B, G, head) from the measured engine step and the measured
    acceptance with those groups, relative to the engine's AR step (the plain 1-token forward when absent); the
    overall choice is the best mean expected speedup over contexts."""
    per_context, score = {}, {}
    for context in contexts:
        ar_ms = latency_ms.get(("engine_step", context, 1, 0, "ar"), latency_ms[("plain", context, 1)])
        rows = []
        for (b, g), acc in sorted(group_acceptance.items()):
            for head in HEADS:
                step_ms = latency_ms.get(("engine_step", context, b, g, head))
                if step_ms is None:
                    continue
                tps = (acc["mean_accepted"] or 0.0) / (step_ms / 1e3)
                rows.append({"block_size": b, "groups": acc["groups"], "num_groups": g, "head": head,
                             "step_ms": step_ms, "step_vs_ar_latency": step_ms / ar_ms,
                             "mean_accepted": acc["mean_accepted"], "expected_tokens_per_s": tps,
                             "expected_speedup_vs_ar": tps * ar_ms / 1e3})
                score[(b, g, head)] = score.get((b, g, head), 0.0) + tps * ar_ms / 1e3
        per_context[str(context)] = rows
    b, g, head = max(score, key=score.get)
    return {"per_context": per_context, "best_block_size": b, "best_groups": group_acceptance[(b, g)]["groups"],
            "head": head, "mean_expected_speedup_vs_ar": score[(b, g, head)] / len(contexts)}


def measure_acceptance(bundle, blocks, prompts, new_tokens, beta, slot0="verifier"):
    from tidar_jax.decode import Decoder

    dec = Decoder.from_bundle(bundle)
    out = {}
    for b in blocks:
        res = dec.generate(prompts, mode="tidar", block_size=b, beta=beta, slot0=slot0,
                           max_new_tokens=new_tokens, eos_token_id=None, allow_untrained_block_size=True)
        s = res.stats
        out[b] = {"mean_accepted": s["mean_accepted"], "tokens_per_nfe": s["tokens_per_nfe"],
                  "accepted_length_hist": s["accepted_length_hist"]}
    return out


def recommend(latency_ms, acceptance, contexts, blocks, trained_block):
    """Per context: expected tokens/s for each B and the best B; ``latency_ms[(kind, L, Q)]`` is the p25."""
    per_context = {}
    for context in contexts:
        ar_ms = latency_ms[("plain", context, 1)]
        rows = []
        for b in blocks:
            step_ms = latency_ms[("tidar_step", context, b * (b + 1))]
            acc = acceptance[b]["mean_accepted"] or 0.0
            tps = acc / (step_ms / 1e3)
            rows.append({"block_size": b, "step_ms": step_ms, "step_vs_ar_latency": step_ms / ar_ms,
                         "mean_accepted": acc, "expected_tokens_per_s": tps,
                         "expected_speedup_vs_ar": tps * ar_ms / 1e3})
        best = max(rows, key=lambda r: r["expected_tokens_per_s"])
        per_context[str(context)] = {"ar_step_ms": ar_ms, "ar_tokens_per_s": 1e3 / ar_ms, "blocks": rows,
                                     "best_block_size": best["block_size"]}
    votes = [per_context[str(c)]["best_block_size"] for c in contexts]
    overall = max(set(votes), key=lambda b: (votes.count(b), -votes.index(b)))
    note = None
    if trained_block is not None and overall != trained_block:
        note = (f"the checkpoint was trained with block size {trained_block}; acceptance at other block sizes was "
                f"measured with allow_untrained_block_size")
    return {"per_context": per_context, "best_block_size": overall, "trained_block_size": trained_block,
            "note": note}


def free_slot_summary(latency_ms, contexts, queries):
    """Largest Q whose latency stays within 1.1x / 1.5x / 2x of Q=1, per context."""
    out = {}
    for context in contexts:
        base = latency_ms[("plain", context, 1)]
        out[str(context)] = {f"max_q_within_{f}x": max(q for q in queries if latency_ms[("plain", context, q)]
                                                      <= f * base) for f in (1.1, 1.5, 2.0)}
    return out


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "checkpoint", "preset", "tiny", "quick", preset=dict(help="random model when no checkpoint"),
                   quick=dict(help="small contexts/queries/rounds (a minute on 2 cores)"))
    p.add_argument("--contexts", help="comma-separated context lengths L (default 256,1024,4096)")
    p.add_argument("--max-query", type=int, help="largest Q in the 1,2,4,... grid (default 512)")
    p.add_argument("--blocks", help="candidate draft block sizes (default 2,4,8,16)")
    p.add_argument("--beta", type=float, default=1.0, help="decode beta (1 = trust AR, lossless)")
    p.add_argument("--slot0", choices=("verifier", "diffusion"), default="verifier",
                   help="decode slot0 rule for the acceptance statistics (trust-diff: --beta 0 --slot0 diffusion)")
    p.add_argument("--groups-grid", action="store_true",
                   help="also time the engine step for every (B, G = 1, 2, 4.. B groups, head strategy) and "
                        "recommend (B, groups, head) from measured step cost and measured acceptance")
    cli.add_shared(p, "rounds", rounds=dict(help="timed interleaved rounds (default 15)"))
    p.add_argument("--stat", choices=("min", "p25", "median"), default="p25",
                   help="latency statistic used for ratios and the recommendation (min is the most robust on a "
                        "busy machine)")
    cli.add_shared(p, "prompts", "prompt_len", "new_tokens", "data", "seed", "out",
                   prompts=dict(help="held-out prompts for the acceptance statistics"),
                   new_tokens=dict(help="tokens generated per prompt for the acceptance statistics"),
                   data=dict(help="prepared data dir for held-out prompts (default: the run's, else data/stdlib)"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    cli.fill_size_defaults(args, DEFAULTS, quick=QUICK, tiny=TINY)
    args.contexts = cli.parse_int_list(str(args.contexts), "--contexts")
    args.blocks = cli.parse_int_list(str(args.blocks), "--blocks")
    cli.require_positive(args, ("max_query", "rounds", "prompts", "prompt_len", "new_tokens"))
    if not 0.0 <= args.beta <= 1.0:
        cli.fail(f"--beta={args.beta}: must be in [0, 1]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    bundle, trained = bc.load_model(args.checkpoint, args.preset, args.seed)
    cfg = bundle.config
    queries = query_grid(args.max_query)
    print(f"model: {bundle.source} ({cfg.num_params / 1e6:.1f}M params); contexts {args.contexts}; Q {queries}; "
          f"TiDAR step blocks {args.blocks}", flush=True)

    cands, meta = build_candidates(bundle, args.contexts, queries, args.blocks, args.beta, args.seed)
    if args.groups_grid:
        more, more_meta = engine_candidates(bundle, args.contexts, args.blocks, args.beta, args.seed)
        cands.update(more)
        meta.update(more_meta)
    times = bc.interleaved(cands, rounds=args.rounds, warmup=2)
    rows, latency_ms = [], {}
    for name, samples in times.items():
        s = bc.stats(samples)
        m = meta[name]
        if m["kind"] == "engine_step":
            latency_ms[("engine_step", m["context"], m["block_size"], m["groups"], m["head"])] = s[args.stat] * 1e3
        else:
            latency_ms[(m["kind"], m["context"], m["query_tokens"])] = s[args.stat] * 1e3
        rows.append({**m, "min_ms": s["min"] * 1e3, "p25_ms": s["p25"] * 1e3, "median_ms": s["median"] * 1e3,
                     "rounds": s["n"]})
    for r in rows:
        r.setdefault("groups", "")
        r.setdefault("head", "")
        base = latency_ms[("plain", r["context"], 1)]
        r["vs_q1"] = r[f"{args.stat}_ms"] / base  # by --stat
        r["ms_per_token"] = r[f"{args.stat}_ms"] / r["query_tokens"]

    data_dir = bc.find_data_dir(args.checkpoint, args.data)
    prompts, prompt_source = bc.heldout_prompts(cfg, data_dir, args.prompts, args.prompt_len, args.seed)
    acceptance = measure_acceptance(bundle, args.blocks, prompts, args.new_tokens, args.beta, args.slot0)
    rec = recommend(latency_ms, acceptance, args.contexts, args.blocks, bundle.config.block_size if trained else None)
    group_acc = None
    if args.groups_grid:
        group_acc = measure_group_acceptance(bundle, args.blocks, acceptance, prompts, args.new_tokens, args.beta,
                                             args.slot0)
        rec["groups"] = recommend_groups(latency_ms, group_acc, args.contexts)
        # what decode.py --recommendation reads: block size, groups and head of the (B, G, head) winner
        rec["best_block_size"] = rec["groups"]["best_block_size"]
        rec["best_groups"] = rec["groups"]["best_groups"]
        rec["head"] = rec["groups"]["head"]

    result = {
        "benchmark": "free_slots", "machine": bc.machine_info(), "model": bc.model_description(bundle, trained),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "warning": None if trained else bc.RANDOM_MODEL_WARNING,
        "latency": rows, "free_slots": free_slot_summary(latency_ms, args.contexts, queries),
        "acceptance": {"prompts": prompt_source, "num_prompts": len(prompts), "new_tokens": args.new_tokens,
                       "beta": args.beta, "slot0": args.slot0, "per_block": {str(b): v for b, v in acceptance.items()}},
        "recommendation": rec,
    }
    os.makedirs(args.out, exist_ok=True)
    bc.write_csv(os.path.join(args.out, "free_slots.csv"), rows)
    bc.write_json(os.path.join(args.out, "free_slots.json"), result)
    if not args.no_plot:
        from benchmarks import plots
        result["plot"] = plots.latency_curve(rows, rec, os.path.join(args.out, "free_slots.png"), args.stat)
    print(report(result), flush=True)
    return result


def report(result) -> str:
    lines = []
    if result["warning"]:
        lines += ["", "!" * 100, result["warning"], "!" * 100]
    lines.append("")
    lines.append(f"latency ({result['settings']['stat']} ms) of the plain forward, batch 1:")
    ctxs = sorted({r["context"] for r in result["latency"]})
    qs = sorted({r["query_tokens"] for r in result["latency"] if r["kind"] == "plain"})
    lat = {(r["context"], r["query_tokens"]): r for r in result["latency"] if r["kind"] == "plain"}
    lines.append("  Q     " + "".join(f"L={c:<14}" for c in ctxs))
    for q in qs:
        stat = result["settings"]["stat"]
        lines.append(f"  {q:<5} " + "".join(f"{lat[(c, q)][stat + '_ms']:7.2f} ({lat[(c, q)]['vs_q1']:4.2f}x) "
                                            for c in ctxs))
    rec = result["recommendation"]
    for c, info in rec["per_context"].items():
        lines.append(f"context {c}: AR {info['ar_tokens_per_s']:.1f} tok/s")
        for r in info["blocks"]:
            lines.append(f"  B={r['block_size']:<3} step {r['step_ms']:7.2f} ms ({r['step_vs_ar_latency']:.2f}x AR)"
                         f"  E[accepted] {r['mean_accepted']:.2f}  -> {r['expected_tokens_per_s']:8.1f} tok/s"
                         f"  ({r['expected_speedup_vs_ar']:.2f}x AR)")
    if "groups" in rec:
        for c, grows in rec["groups"]["per_context"].items():
            lines.append(f"context {c}: engine step per (B, groups, head)")
            for r in grows:
                lines.append(f"  B={r['block_size']:<3} groups={','.join(map(str, r['groups'])):<16} {r['head']:<9}"
                             f" step {r['step_ms']:7.2f} ms ({r['step_vs_ar_latency']:.2f}x AR)  E[accepted] "
                             f"{r['mean_accepted']:.2f} -> {r['expected_speedup_vs_ar']:.2f}x AR")
        lines.append(f"recommended (B, groups, head): ({rec['best_block_size']}, {rec['best_groups']}, "
                     f"{rec['head']})")
    lines.append(f"recommended draft block size: B = {rec['best_block_size']}"
                 + ("" if result["model"]["trained"] else "   (RANDOM MODEL: not meaningful)"))
    if rec["note"]:
        lines.append(f"note: {rec['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
