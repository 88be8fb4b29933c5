"""The real-model recipe's curve: every checkpoint of a TiDAR run continual-pretrained from a pretrained HF model
(configs/smollm2-135m-tidar.yaml), and the untouched model itself as step 0, measured on the held-out split.

    python -m benchmarks.real_model --run-dir runs/smol [--steps 16,32,...] [--prompts 16] [--json PATH]

Per model:
  * held-out AR-mode loss and diffusion loss (``heldout_ar_loss``: the run's eval windows,
    data.eval_batch_size x data.eval_batches), the AR loss also relative to the untouched model's;
  * teacher-forced agreement per block slot (``teacher_forced_agreement``);
  * lossless TiDAR (beta=1, slot 0 = verifier, greedy) on the first ``--prompts`` held-out documents (32-token
    prompts, ``--new-tokens`` new tokens, no EOS): T/NFE counted per row (the batch-1 figure), acceptance per
    draft slot, and whether the output equals greedy AR token for token.
With ``--speed CHECKPOINT``: decode speed at batch 1 on this machine instead: greedy AR vs lossless TiDAR (all
mask groups, and pruned to groups 1..G), one held-out prompt per call, every configuration compiled first, then
``--rounds`` rounds over the prompts with the configurations interleaved; tokens/s from the summed wall times, the
outputs checked identical to AR.
Minutes: wall time from the run's start (its config.yaml) to the checkpoint's write, as the run logged it.
Step 0 is the pretrained model with the appended untrained ``<|mask|>`` (what ``model.init_from`` starts from).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import yaml


def heldout_ar_loss(bundle, data_dir: str, seq_len: int, batch: int, max_batches: int,
                    block_size: int | None = None) -> dict:
    """Token-mean held-out next-token cross-entropy and accuracy of the model as a plain causal LM; with
    ``block_size`` also the diffusion loss of the mask half of the TiDAR training layout at that block size."""
    from flax import nnx

    from tidar_jax.data import eval_batches
    from tidar_jax.model import causal_mask
    from tidar_jax.objective import ar_loss, tidar_loss
    from tidar_jax.train.step import tidar_inputs

    def loss_fn(params, tokens_NS):
        model = nnx.merge(bundle.graphdef, params)
        n, s = tokens_NS.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (n, s))
        logits, _ = model(tokens_NS, positions, causal_mask(n, s))
        _, m = ar_loss(logits, tokens_NS)
        diff = jnp.zeros(())
        if block_size is not None:
            tokens_N2S, pos2, mask2 = tidar_inputs(tokens_NS, bundle.config.replace(block_size=block_size))
            logits2, _ = model(tokens_N2S, pos2, mask2)
            diff = tidar_loss(logits2, tokens_NS)[1]["diff_loss"]
        return m["ar_loss"], m["ar_acc"], m["ar_tokens"], diff

    fn = jax.jit(loss_fn)
    tot = acc = count = dl = 0.0
    batches = eval_batches(data_dir, seq_len, batch, max_batches)
    for tokens in batches:
        loss, a, n, d = jax.device_get(fn(bundle.params, jnp.asarray(tokens)))
        tot, acc, count = tot + float(loss) * float(n), acc + float(a) * float(n), count + float(n)
        dl += float(d)  # every batch has the same (full) number of diffusion targets
    out = {"ar_loss": tot / count, "ar_acc": acc / count, "tokens": int(count), "batches": len(batches)}
    if block_size is not None:
        out["diff_loss"] = dl / len(batches)
    return out



def teacher_forced_agreement(bundle, data_dir: str, seq_len: int, batch: int, batches: int) -> dict:
    """Per slot j of a block: P(argmax diffusion logits at p == argmax AR logits predicting p), p in slot j."""
    from flax import nnx

    from tidar_jax.data import eval_batches
    from tidar_jax.model import causal_mask
    from tidar_jax.train.step import tidar_inputs

    block = bundle.config.block_size

    def agree(params, tokens_NS):
        model = nnx.merge(bundle.graphdef, params)
        n, s = tokens_NS.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (n, s))
        ar_NSV, _ = model(tokens_NS, positions, causal_mask(n, s))
        tokens_N2S, pos2, mask2 = tidar_inputs(tokens_NS, bundle.config)
        both_N2SV, _ = model(tokens_N2S, pos2, mask2)
        verifier_NS = jnp.argmax(ar_NSV[:, :-1], axis=-1)  # AR at p-1 predicts p, for p = 1..S-1
        draft_NS = jnp.argmax(both_N2SV[:, s + 1:], axis=-1)  # mask at p predicts p
        data_NS = tokens_NS[:, 1:]
        return verifier_NS == draft_NS, draft_NS == data_NS, verifier_NS == data_NS

    fn = jax.jit(agree)
    hits = np.zeros(block)
    draft_true = np.zeros(block)
    counts = np.zeros(block)
    verifier_true = 0.0
    for tokens in eval_batches(data_dir, seq_len, batch, batches):
        same, dt, vt = (np.asarray(x) for x in jax.device_get(fn(bundle.params, jnp.asarray(tokens))))
        slots = (np.arange(1, seq_len)) % block
        for j in range(block):
            hits[j] += same[:, slots == j].sum()
            draft_true[j] += dt[:, slots == j].sum()
            counts[j] += same[:, slots == j].size
        verifier_true += vt.mean()
    nb = len(eval_batches(data_dir, seq_len, batch, batches))
    return {"draft_eq_verifier": (hits / counts).tolist(), "draft_eq_data": (draft_true / counts).tolist(),
            "verifier_eq_data": verifier_true / nb}



def repeated_share(prompt: list[int], generated: list[int], n: int = 8) -> float:
    """Share of the generated tokens that complete an n-gram already seen earlier in prompt + generated: about 0
    for ordinary text, near 1 for a loop."""
    seq, seen, hits = list(prompt) + list(generated), set(), 0
    for i in range(n, len(seq) + 1):
        gram = tuple(seq[i - n:i])
        hits += i > len(prompt) and gram in seen
        seen.add(gram)
    return hits / max(len(generated), 1)


LOOP_SHARE = 0.5  # a continuation with more than half its tokens repeating an earlier 8-gram counts as a loop


def models(run_dir: str, steps: list[int] | None):
    """``(step, path, minutes)`` for step 0 (the init model) and each chosen checkpoint."""
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    t0 = os.path.getmtime(os.path.join(run_dir, "config.yaml"))
    out = [(0, cfg["model"]["init_from"], 0.0)] if steps is None or 0 in steps else []
    ck = os.path.join(run_dir, "checkpoints")
    found = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
    for s in found if steps is None else [s for s in found if s in steps]:
        out.append((s, os.path.join(ck, str(s)), (os.path.getmtime(os.path.join(ck, str(s))) - t0) / 60))
    return cfg, out


def measure(bundle, cfg: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    from tidar_jax.decode import Decoder
    from tidar_jax.demo import per_position_acceptance

    d = cfg["data"]
    block = bundle.config.block_size
    loss = heldout_ar_loss(bundle, d["dir"], d["seq_len"], d["eval_batch_size"], d["eval_batches"], block)
    tf = teacher_forced_agreement(bundle, d["dir"], d["seq_len"], d["eval_batch_size"], d["eval_batches"])
    dec = Decoder.from_bundle(bundle, check_block_size=False)
    tidar = dec.generate(prompts, mode="tidar", block_size=block, beta=1.0, slot0="verifier",
                         max_new_tokens=new_tokens, eos_token_id=None)
    ar = dec.generate(prompts, mode="ar", max_new_tokens=new_tokens, eos_token_id=None)
    rep = [repeated_share(p, t) for p, t in zip(prompts, tidar.tokens)]
    plain = [i for i, r in enumerate(rep) if r <= LOOP_SHARE]
    tokens, nfe = tidar.stats["new_tokens"], tidar.stats["nfe_per_row"]
    return {"ar_loss": loss["ar_loss"], "diff_loss": loss.get("diff_loss"),
            "draft_eq_verifier": tf["draft_eq_verifier"], "tnfe_b1": tidar.stats["tokens_per_nfe"],
            "slot_acceptance": per_position_acceptance(tidar.stats["accepted_length_hist"], block),
            "accepted_length_hist": tidar.stats["accepted_length_hist"],
            "lossless_equals_ar": tidar.tokens == ar.tokens,
            "repeated_8gram_share": float(np.mean(rep)), "looping_rows": len(prompts) - len(plain),
            "tnfe_b1_not_looping": sum(tokens[i] for i in plain) / max(sum(nfe[i] for i in plain), 1),
            "texts": [dec.tokenizer.decode(t) for t in tidar.tokens[:3]] if dec.tokenizer is not None else None}


def speed(path: str, cfg: dict, prompts: list[list[int]], new_tokens: int, rounds: int, groups: list) -> dict:
    from tidar_jax.decode import Decoder
    from tidar_jax.loading import load_for_inference

    dec = Decoder.from_bundle(load_for_inference(path))
    block = dec.cfg.block_size
    configs = {"ar": {"mode": "ar"}}
    for g in groups:
        configs[f"tidar_g{g}" if g < block else "tidar"] = {"mode": "tidar", "groups": None if g >= block else g}
    for kw in configs.values():  # compile every program first
        dec.generate([prompts[0]], max_new_tokens=new_tokens, eos_token_id=None, **kw)
    wall = {k: 0.0 for k in configs}
    tokens = {k: 0 for k in configs}
    nfe = {k: 0 for k in configs}
    outputs = {k: [] for k in configs}
    for r in range(rounds):
        for prompt in prompts:
            for name, kw in configs.items():  # interleaved: load changes hit every configuration alike
                res = dec.generate([prompt], max_new_tokens=new_tokens, eos_token_id=None, **kw)
                wall[name] += res.stats["wall_s"]
                tokens[name] += sum(res.stats["new_tokens"])
                nfe[name] += sum(res.stats["nfe_per_row"])
                if r == 0:
                    outputs[name].append(res.tokens[0])
    out = {name: {"tokens_per_s": tokens[name] / wall[name], "tokens_per_nfe": tokens[name] / nfe[name],
                  "identical_to_ar": outputs[name] == outputs["ar"]} for name in configs}
    for name in configs:
        out[name]["speedup_vs_ar"] = out[name]["tokens_per_s"] / out["ar"]["tokens_per_s"]
    return {"checkpoint": path, "block_size": block, "prompts": len(prompts), "new_tokens": new_tokens,
            "rounds": rounds, "configs": out}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", default=None, help="comma-separated checkpoint steps, 0 = the untouched model "
                                                 "(default: all)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--base-ar-loss", type=float, default=None,
                   help="the untouched model's held-out AR loss, when step 0 is not in --steps")
    p.add_argument("--speed", default=None, metavar="CHECKPOINT", help="measure decode speed of this checkpoint")
    p.add_argument("--rounds", type=int, default=2, help="with --speed")
    p.add_argument("--groups", default="1,2,4", help="with --speed: TiDAR group counts G (>= B: all groups)")
    args = p.parse_args(argv)

    from tidar_jax.demo import heldout_prompts
    from tidar_jax.loading import load_for_inference

    steps = None if args.steps is None else [int(s) for s in args.steps.split(",")]
    cfg, chosen = models(args.run_dir, steps)
    prompts = heldout_prompts(cfg["data"]["dir"], args.prompts, 32)
    block = cfg["model"]["block_size"]
    if args.speed:
        r = speed(args.speed, cfg, prompts, args.new_tokens, args.rounds, [int(g) for g in args.groups.split(",")])
        print("| decode, batch 1 | tokens/s | vs AR | T/NFE | output == AR |")
        print("|---|---|---|---|---|")
        for name, c in r["configs"].items():
            print(f"| {name} | {c['tokens_per_s']:.1f} | {c['speedup_vs_ar']:.2f}x | {c['tokens_per_nfe']:.2f} | "
                  f"{'yes' if c['identical_to_ar'] else 'NO'} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
        return [r]
    rows, base = [], args.base_ar_loss
    print("| step | minutes | held-out AR loss (vs untouched) | diffusion loss | draft == verifier, slots 0..B-1 | "
          "lossless T/NFE batch 1 | decode acceptance, slots 1..B-1 | looping rows, T/NFE of the others | "
          "lossless == AR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for step, path, minutes in chosen:
        bundle = load_for_inference(path, add_mask_token=True, block_size=block) if step == 0 \
            else load_for_inference(path)
        r = {"step": step, "minutes": minutes, **measure(bundle, cfg, prompts, args.new_tokens)}
        base = r["ar_loss"] if step == 0 else base
        r["ar_loss_rel"] = r["ar_loss"] / base - 1 if base else None  # with step 0 in the same call
        rows.append(r)
        fmt = lambda xs: " / ".join("-" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
        rel = f" ({r['ar_loss_rel']:+.1%})" if step and r["ar_loss_rel"] is not None else ""
        print(f"| {step} | {minutes:.1f} | {r['ar_loss']:.4f}{rel} | {r['diff_loss']:.3f} | "
              f"{fmt(r['draft_eq_verifier'])} | {r['tnfe_b1']:.2f} | {fmt(r['slot_acceptance'])} | "
              f"{r['looping_rows']}/{len(prompts)}, {r['tnfe_b1_not_looping']:.2f} | "
              f"{'yes' if r['lossless_equals_ar'] else 'NO'} |", flush=True)
        del bundle
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run_dir": args.run_dir, "prompts": args.prompts, "new_tokens": args.new_tokens,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
