"""Small-scale fidelity study: tiny models trained with the same budget (same model, seed, data order, steps,
batch and sequence length) with (a) the AR objective only and (b) the TiDAR objective at B = 4, 8, 16; then, for
each, the held-out AR-mode loss and the tokens per forward (T/NFE) of greedy TiDAR decoding on held-out prompts.

    python benchmarks/fidelity.py [--steps 300] [--blocks 4,8,16] [--quick] [--out benchmarks/results]

The paper's claims checked here: AR-mode quality of a TiDAR model stays close to the AR-only model, and T/NFE rises
with the block size. Training runs ``train.py`` (the project's trainer) once per variant into ``--runs-dir``;
re-running resumes/reuses those runs. "Same budget" means equal steps and equal clean tokens; a TiDAR step costs
more compute (the doubled [clean | mask] sequence), so the measured training wall time is reported next to each.
AR-mode loss is computed here, independently of the trainer's eval, as the token-mean next-token cross-entropy of
the model used as a plain causal LM over held-out windows. T/NFE uses lossless greedy decoding (beta=1); the
AR-only model is also decoded with TiDAR at the smallest B as a control (its diffusion drafts are untrained).
Writes ``fidelity.json`` and ``fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = bc._ROOT
# The study's model: the tiny preset's data and optimiser, a smaller network (~0.9M params) so that four runs fit a
# small CPU budget. Overrides given with --set come after these and win.
MODEL_OVERRIDES = ["model.hidden_size=128", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.mlp_size=384", "logging.decode_probe_prompts=0"]
DEFAULTS = {"steps": 300, "blocks": "4,8,16", "eval_batches": 16, "prompts": 8, "prompt_len": 64, "new_tokens": 64}
QUICK = {"steps": 60, "blocks": "4,8,16", "eval_batches": 4, "prompts": 4, "prompt_len": 32, "new_tokens": 32}


def variants(blocks: list[int]) -> list[dict]:
    return [{"name": "ar", "objective": "ar", "block_size": min(blocks)}] + \
        [{"name": f"tidar_b{b}", "objective": "tidar", "block_size": b} for b in blocks]


TRAIN_RECORD = "fidelity_train.json"  # in each run dir: what training that run cost, kept when it is reused


def train_variant(args, variant: dict) -> dict:
    run_dir = os.path.join(args.runs_dir, variant["name"])
    record_path = os.path.join(run_dir, TRAIN_RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("steps") == args.steps:  # already trained to this budget: reuse, keep its measured cost
            print(f"[fidelity] reusing {run_dir} (trained {args.steps} steps in {record['train_wall_s']:.0f} s)",
                  flush=True)
            return {"run_dir": run_dir, "train_wall_s": record["train_wall_s"], "reused": True,
                    "train_step_s_median": logged_step_time(run_dir), "train_log_tail": record.get("log_tail", [])}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config, "--run-dir", run_dir,
           "--steps", str(args.steps), f"train.objective={variant['objective']}",
           f"model.block_size={variant['block_size']}", f"train.seed={args.seed}",
           f"checkpoint.every={args.steps}", f"logging.eval_every={args.steps}", "logging.progress=false",
           *MODEL_OVERRIDES, *args.set]
    print(f"[fidelity] training {variant['name']}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        bc.fail(f"training {variant['name']} failed (exit {proc.returncode}): " + " | ".join(tail))
    tail = proc.stdout.strip().splitlines()[-8:]
    bc.write_json(record_path, {"steps": args.steps, "train_wall_s": wall, "command": cmd[1:], "log_tail": tail})
    return {"run_dir": run_dir, "train_wall_s": wall, "reused": False, "train_step_s_median": logged_step_time(run_dir),
            "train_log_tail": tail}


def logged_step_time(run_dir: str) -> float | None:
    """Median of the trainer's logged ``perf/step_time_s`` (TensorBoard), or None when it logged none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    if "perf/step_time_s" not in ea.Tags().get("scalars", []):
        return None
    return float(np.median([e.value for e in ea.Scalars("perf/step_time_s")]))


def heldout_ar_loss(bundle, data_dir: str, seq_len: int, batch: int, max_batches: int) -> dict:
    """Token-mean held-out next-token cross-entropy and accuracy of the model as a plain causal LM."""
    from flax import nnx

    from tidar_jax.data import eval_batches
    from tidar_jax.model import causal_mask
    from tidar_jax.objective import ar_loss

    def loss_fn(params, tokens_NS):
        model = nnx.merge(bundle.graphdef, params)
        n, s = tokens_NS.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (n, s))
        logits, _ = model(tokens_NS, positions, causal_mask(n, s))
        _, m = ar_loss(logits, tokens_NS)
        return m["ar_loss"], m["ar_acc"], m["ar_tokens"]

    fn = jax.jit(loss_fn)
    tot = acc = count = 0.0
    batches = eval_batches(data_dir, seq_len, batch, max_batches)
    for tokens in batches:
        loss, a, n = jax.device_get(fn(bundle.params, jnp.asarray(tokens)))
        tot, acc, count = tot + float(loss) * float(n), acc + float(a) * float(n), count + float(n)
    return {"ar_loss": tot / count, "ar_acc": acc / count, "tokens": int(count), "batches": len(batches)}


def decode_stats(bundle, prompts, block: int, new_tokens: int) -> dict:
    from tidar_jax.decode import Decoder

    res = Decoder.from_bundle(bundle).generate(
        prompts, mode="tidar", block_size=block, beta=1.0, slot0="verifier", max_new_tokens=new_tokens,
        eos_token_id=None, allow_untrained_block_size=True)
    s = res.stats
    return {"block_size": block, "tokens_per_nfe": s["tokens_per_nfe"], "mean_accepted": s["mean_accepted"],
            "accepted_length_hist": s["accepted_length_hist"], "nfe": s["nfe"],
            "distinct_4gram_fraction": distinct_ngram_fraction(res.tokens, 4),
            "sample": res.texts[0][:300] if res.texts else None}


def distinct_ngram_fraction(rows: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over the generated rows: near 0 for a continuation stuck in a loop, whose
    drafts are trivially accepted (T/NFE is then inflated), near 1 for varied text."""
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def evaluate(args, variant: dict, trained: dict) -> dict:
    from tidar_jax.loading import load_for_inference

    bundle = load_for_inference(trained["run_dir"])
    data_dir = bc.find_data_dir(trained["run_dir"], args.data)
    if data_dir is None:
        bc.fail(f"cannot find the held-out data of {trained['run_dir']}; pass --data DIR")
    seq_len = args.eval_seq_len
    loss = heldout_ar_loss(bundle, data_dir, seq_len, args.eval_batch, args.eval_batches)
    prompts, source = bc.heldout_prompts(bundle.config, data_dir, args.prompts, args.prompt_len, args.seed)
    dec = decode_stats(bundle, prompts, variant["block_size"], args.new_tokens)
    # short horizon from many real contexts: the first 2B+1 tokens only, before a weak model's greedy
    # continuation can fall into a loop (loops are trivially easy to draft and inflate the long-run T/NFE)
    many, _ = bc.heldout_prompts(bundle.config, data_dir, args.short_prompts, args.prompt_len, args.seed)
    short = decode_stats(bundle, many, variant["block_size"], 2 * variant["block_size"] + 1)
    return {**variant, **trained, "step": bundle.step, "num_params": bundle.config.num_params,
            "heldout": loss, "decode": dec, "decode_short": short, "prompts": source}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"), help="training preset")
    p.add_argument("--steps", type=int, help="training steps per variant (default 300; --quick 60)")
    p.add_argument("--blocks", help="TiDAR block sizes (default 4,8,16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every variant (repeatable), e.g. --set data.seq_len=64")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "fidelity"))
    p.add_argument("--data", help="prepared data dir (default: the one each run trained on)")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--prompts", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--short-prompts", type=int, default=32,
                   help="held-out contexts for the short-horizon acceptance (2B+1 new tokens each)")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    bc.fill_size_defaults(args, DEFAULTS, quick=QUICK)
    args.blocks = bc.parse_int_list(str(args.blocks), "--blocks")
    bc.require_positive(args, ("steps", "eval_seq_len", "eval_batch", "eval_batches", "prompts", "prompt_len",
                               "new_tokens", "short_prompts"))
    if not os.path.isfile(args.config):
        bc.fail(f"--config {args.config}: no such file")
    for item in args.set:
        if "=" not in item:
            bc.fail(f"--set {item!r}: must be KEY=VALUE")
    args.runs_dir = os.path.abspath(args.runs_dir)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for v in variants(args.blocks):
        trained = train_variant(args, v)
        rows.append(evaluate(args, v, trained))
        r = rows[-1]
        print(f"[fidelity] {v['name']}: held-out AR loss {r['heldout']['ar_loss']:.4f}, T/NFE "
              f"{r['decode']['tokens_per_nfe']:.2f} (B={r['decode']['block_size']}), train {r['train_wall_s']:.0f} s",
              flush=True)
    ar = rows[0]
    for r in rows:
        r["ar_loss_minus_ar_only"] = r["heldout"]["ar_loss"] - ar["heldout"]["ar_loss"]
        r["train_wall_vs_ar_only"] = r["train_wall_s"] / ar["train_wall_s"]
        if r["train_step_s_median"] and ar["train_step_s_median"]:
            r["train_step_vs_ar_only"] = r["train_step_s_median"] / ar["train_step_s_median"]
    tidar = rows[1:]
    tpnfe = [r["decode"]["tokens_per_nfe"] for r in tidar]
    short = [r["decode_short"]["mean_accepted"] for r in tidar]
    checks = {
        "tnfe_rises_with_block_size": all(b > a for a, b in zip(tpnfe, tpnfe[1:])),
        "short_horizon_acceptance_rises_with_block_size": all(b > a for a, b in zip(short, short[1:])),
        "max_ar_loss_gap_nats": max(r["ar_loss_minus_ar_only"] for r in tidar),
    }
    result = {"benchmark": "fidelity", "machine": bc.machine_info(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": rows, "checks": checks}
    bc.write_json(os.path.join(args.out, "fidelity.json"), result)
    bc.write_text(os.path.join(args.out, "fidelity.md"), markdown(result))
    print(markdown(result), flush=True)
    return result


def _step(r) -> str:
    if not r.get("train_step_s_median"):
        return "-"
    ratio = r.get("train_step_vs_ar_only")
    return f"{r['train_step_s_median']:.2f}" + (f" ({ratio:.2f}x)" if ratio else "")


def markdown(result) -> str:
    st = result["settings"]
    m = result["machine"]
    lines = ["# Fidelity study (small scale)", "",
             f"Command: `python benchmarks/fidelity.py --steps {st['steps']} --blocks "
             f"{','.join(map(str, st['blocks']))}" + "".join(f" --set {s}" for s in st["set"])
             + (" --quick" if st["quick"] else "") + "`", "",
             f"Machine: {m['cpu_model']}, {m['cpu_threads']} CPUs, load average {m['load_average_1_5_15']}, "
             f"jax {m['versions']['jax']} on {m['jax_backend']}.", "",
             f"Every variant: same model ({result['runs'][0]['num_params'] / 1e6:.2f}M params), seed {st['seed']}, "
             f"data order, {st['steps']} steps. Held-out AR-mode loss over {result['runs'][0]['heldout']['tokens']} "
             f"held-out tokens (windows of {st['eval_seq_len']}); T/NFE from lossless greedy TiDAR decoding of "
             f"{st['prompts']} held-out prompts ({st['prompt_len']} tokens) for {st['new_tokens']} new tokens.", "",
             "| model | objective | B (train / decode) | held-out AR loss | vs AR-only | AR acc | T/NFE | "
             "mean accepted | distinct 4-grams | E[accepted] from real contexts | train step s (x AR-only) | "
             "train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        train_b = r["block_size"] if r["objective"] == "tidar" else "-"
        lines.append(
            f"| {r['name']} | {r['objective']} | {train_b} / {r['decode']['block_size']} | "
            f"{r['heldout']['ar_loss']:.4f} | {r['ar_loss_minus_ar_only']:+.4f} | {r['heldout']['ar_acc']:.3f} | "
            f"{r['decode']['tokens_per_nfe']:.2f} | {r['decode']['mean_accepted']:.2f} | "
            f"{r['decode'].get('distinct_4gram_fraction', float('nan')):.2f} | "
            f"{r['decode_short']['mean_accepted']:.2f} | "
            f"{_step(r)} | {r['train_wall_s']:.0f} |")
    c = result["checks"]
    lines += ["", f"- T/NFE rises with B: **{'yes' if c['tnfe_rises_with_block_size'] else 'no'}** (long "
              "continuations); E[accepted] from real contexts rises with B: "
              f"**{'yes' if c['short_horizon_acceptance_rises_with_block_size'] else 'no'}**.",
              f"- Largest AR-mode loss gap of a TiDAR model to the AR-only model: **{c['max_ar_loss_gap_nats']:+.4f} "
              "nats/token** (positive = TiDAR worse).",
              "- The AR-only row's T/NFE is TiDAR decoding with its untrained diffusion drafts (a control).",
              "- Distinct 4-grams of the greedy continuations: a low value means the continuation loops, and a "
              "looping continuation is easy to draft, so T/NFE is then inflated relative to varied text.",
              "- E[accepted] from real contexts: mean accepted drafts per decode step while generating only the "
              f"first 2B+1 tokens after each of {st['short_prompts']} held-out contexts -- the acceptance near real "
              "text, before a loop can form.",
              "- Train step s: median of the trainer's logged step time; train wall s also includes process start, "
              "compilation, evaluation and checkpointing. Both were measured on a shared machine.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
