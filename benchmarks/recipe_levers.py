"""Why a trained TiDAR run's drafts are accepted or rejected: one row of benchmarks/results/recipe_levers.md.

    python benchmarks/recipe_levers.py --run-dir runs/tiny [--label NAME] [--train-s SECONDS] [--json PATH]

For one run dir it measures, on the held-out split:
  * the held-out AR-mode loss (the training summary's eval windows: data.eval_batch_size x data.eval_batches);
  * teacher-forced draft agreement per block slot j = 0..B-1: on real held-out windows, how often the mask half's
    argmax at a position in slot j equals the AR head's argmax for the same position (the verifier's greedy token
    given the true prefix). This is the drafter's quality before decoding compounds it;
  * the demo's figures (``tidar_jax.demo.run_demo``, one timing repeat): lossless T/NFE at batch 1 and 4 on the
    demo's 8 held-out prompts, the per-slot acceptance during decoding, and whether lossless == AR;
  * lossless T/NFE and per-slot acceptance on the first 32 held-out prompts (the demo's 8 and 24 more), decoded
    in one batch: 8 prompts resolve T/NFE to about +-0.2, and which loops the verifier falls into varies.
"""

from __future__ import annotations

import argparse
import io
import json
import os

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

import jax
import jax.numpy as jnp
import numpy as np
import yaml

WIDE_PROMPTS = 32


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


def measure(run_dir: str) -> dict:
    from benchmarks.fidelity import heldout_ar_loss
    from tidar_jax.demo import run_demo
    from tidar_jax.loading import load_for_inference

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    data_dir, seq_len = cfg["data"]["dir"], cfg["data"]["seq_len"]
    batch, batches = cfg["data"]["eval_batch_size"], cfg["data"]["eval_batches"]
    bundle = load_for_inference(run_dir)
    loss = heldout_ar_loss(bundle, data_dir, seq_len, batch, batches, bundle.config.block_size)
    tf = teacher_forced_agreement(bundle, data_dir, seq_len, batch, batches)
    demo = run_demo(run_dir, repeats=1, out=io.StringIO())
    # more prompts than the demo's 8, in one batch (a row's lossless acceptance does not depend on its batch)
    from tidar_jax.decode import Decoder
    from tidar_jax.demo import heldout_prompts, per_position_acceptance

    many = heldout_prompts(data_dir, WIDE_PROMPTS, 48)
    wide = Decoder.from_bundle(bundle).generate(many, mode="tidar", block_size=bundle.config.block_size, beta=1.0,
                                                slot0="verifier", max_new_tokens=64, eos_token_id=None)
    b1, b4 = demo["batches"]["1"], demo["batches"]["4"]
    return {"run_dir": run_dir, "block_size": bundle.config.block_size, "step": bundle.step,
            "heldout_ar_loss": loss["ar_loss"], "heldout_diff_loss": loss.get("diff_loss"),
            "teacher_forced": tf,
            "tnfe_b1": b1["tidar_lossless"]["tokens_per_nfe"], "tnfe_b4": b4["tidar_lossless"]["tokens_per_nfe"],
            "decode_slot_acceptance": demo["per_position_acceptance"],
            "hist_b1": b1["tidar_lossless"]["accepted_length_hist"],
            "wide_prompts": len(many), "tnfe_wide": wide.stats["tokens_per_nfe"],
            "wide_slot_acceptance": per_position_acceptance(wide.stats["accepted_length_hist"],
                                                            bundle.config.block_size),
            "lossless_equals_ar": bool(b1["lossless_equals_ar"] and b4["lossless_equals_ar"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--label", default=None)
    p.add_argument("--train-s", type=float, default=None, help="the training wall time to print beside the row")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    r = measure(args.run_dir)
    r["label"], r["train_s"] = args.label or args.run_dir, args.train_s
    fmt = lambda xs: " / ".join(f"{x:.2f}" if x is not None else "-" for x in xs)  # noqa: E731
    print(f"| {r['label']} | {r['block_size']} | {r['tnfe_b1']:.2f} | {r['tnfe_b4']:.2f} | "
          f"{r['heldout_ar_loss']:.3f} | {fmt(r['teacher_forced']['draft_eq_verifier'])} | "
          f"{fmt(r['decode_slot_acceptance'])} | {r['tnfe_wide']:.2f} | {fmt(r['wide_slot_acceptance'])} | {'yes' if r['lossless_equals_ar'] else 'NO'} | "
          f"{r['train_s'] if r['train_s'] is not None else '-'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
