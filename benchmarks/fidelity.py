"""Small-scale fidelity study at equal training compute: AR-only, TiDAR from scratch, and the paper's recipe (AR
first, then TiDAR initialised from it) at several splits of the budget, at several block sizes; optionally TiDAR
with each draft-loss option (distillation, position weighting, chain, and all of them combined).

    python benchmarks/fidelity.py [--steps 200] [--blocks 2,4,8] [--splits 0.5,0.8] [--recipe-lr 7e-4]
                                  [--options paper] [--seeds 0,1] [--budget flops|steps] [--quick]
                                  [--out benchmarks/results]

Budget: ``--steps`` is the step count of TiDAR from scratch with the paper loss at the smallest B; with ``--budget
flops`` (default) every variant trains for the steps that spend the same training FLOPs
(``tidar_jax.train.flops.train_step_flops``, an analytic matmul count that a test checks against the compiled step's
XLA cost analysis), so the AR-only model, whose step runs S tokens instead of 2S, trains about twice as many steps.
A recipe variant ``recipe_b{B}_ar{P}`` spends P% of the budget on an AR run (shared by every B of that split and
seed) and the rest on a TiDAR run initialised from it (``model.init_from``) at ``--recipe-lr`` with a fresh
optimizer. ``--budget steps`` gives every variant the same steps (the earlier equal-steps study; not for recipes).

Measured per run: held-out AR-mode loss (the model as a plain causal LM), held-out diffusion loss (mask half of
the TiDAR layout), lossless greedy T/NFE (beta=1, slot0=verifier) on held-out prompts (the held-out documents,
i.e. stdlib modules the training split never saw) with the accepted-length histogram, the short-horizon
acceptance from many real contexts and, from it, how often the draft in each block slot equals the verifier's
token (given the earlier slots were accepted). The held-out unigram entropy is the bar any model must clear.
Training runs ``train.py`` (the project's trainer) once per run and seed into ``--runs-dir``; a run trained to the
same step count is reused. Writes ``fidelity.json`` and ``fidelity.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

from benchmarks import ROOT, cli  # noqa: E402
from benchmarks import bench_common as bc  # noqa: E402
from tidar_jax.demo import per_position_acceptance  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# The study's model: the (pre-issue-16) tiny preset's optimiser, pinned here, on a 1024-token BPE vocabulary of the same stdlib corpus (its own
# data dir) and a smaller network (~0.2M params, S=64), so that a dozen runs fit a shared 2-core CPU in ~30 min.
# The LM head dominates the step at vocab 4096; 1024 cuts the step ~2.5x. Overrides given with --set win.
MODEL_OVERRIDES = ["model.vocab_size=1024", "data.vocab_size=1024", "data.dir=data/stdlib_v1024",
                   "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.mlp_size=192", "data.seq_len=64", "data.global_batch=8", "data.eval_batches=2",
                   "optim.lr=2e-3", "optim.min_lr=1e-4", "optim.warmup_frac=0.05", "logging.decode_probe_prompts=0"]
DEFAULTS = {"steps": 200, "blocks": "2,4,8", "eval_batches": 16, "prompts": 8, "prompt_len": 64, "new_tokens": 64}
QUICK = {"steps": 60, "blocks": "4", "eval_batches": 4, "prompts": 4, "prompt_len": 32, "new_tokens": 32}
# The draft-loss options compared (train.* overrides); "combo" is all of them at once.
OPTIONS = {
    "paper": [],
    "distill": ["train.distill_weight=1.0", "train.distill_temperature=1.0"],
    "position": ["train.position_weighting=exponential", "train.position_decay=0.7"],
    "chain": ["train.chain_weight=1.0"],
}
OPTIONS["combo"] = OPTIONS["distill"] + OPTIONS["position"] + OPTIONS["chain"]


def variants(blocks: list[int], options=("paper",), splits=()) -> list[dict]:
    """The AR-only model, TiDAR from scratch with each option at each block size (paper = ``tidar_b{B}``), then
    the recipe (AR for a fraction ``split`` of the budget, then TiDAR from it) at each split and block size."""
    out = [{"name": "ar", "objective": "ar", "block_size": min(blocks)}]
    for b in blocks:
        for opt in options:
            name = f"tidar_b{b}" if opt == "paper" else f"tidar_b{b}_{opt}"
            out.append({"name": name, "objective": "tidar", "block_size": b, "option": opt,
                        "overrides": list(OPTIONS[opt])})
    for split in splits:
        for b in blocks:
            out.append({"name": f"recipe_b{b}_ar{round(split * 100)}", "objective": "tidar", "block_size": b,
                        "option": "paper", "split": split, "overrides": []})
    return out


def study_config(args, variant: dict):
    """The resolved ``TrainConfig`` of a variant (the one ``train.py`` gets)."""
    from tidar_jax.train.config import load_config

    return load_config(args.config, _overrides(args, variant, args.seeds[0]))


def _overrides(args, variant: dict, seed: int) -> list[str]:
    return [f"train.objective={variant['objective']}", f"model.block_size={variant['block_size']}",
            f"train.seed={seed}", *MODEL_OVERRIDES, *variant.get("overrides", []), *args.set]


def step_flops(args, variant: dict) -> float:
    """Analytic training FLOPs of one step of this variant (matmuls; the draft-loss terms add only elementwise
    work, measured at about +3% of the compiled step in docs/benchmarks.md, and are not counted)."""
    from tidar_jax.train.flops import train_step_flops

    cfg = study_config(args, variant)
    probe = dict(cfg.model.arch)
    probe["mask_token_id"] = probe.get("mask_token_id") or 0
    from tidar_jax.config import ModelConfig

    return train_step_flops(ModelConfig.from_dict(probe), cfg.data.global_batch, cfg.data.seq_len,
                            variant["objective"])


def assign_steps(args, rows: list[dict]) -> None:
    """Steps per variant: equal FLOPs (TiDAR from scratch with the paper loss at the smallest B gets ``--steps``)
    or equal steps. A recipe variant splits its FLOPs: ``ar_steps`` of AR, then ``steps`` of TiDAR."""
    ref = next(v for v in rows if v["objective"] == "tidar" and "split" not in v)
    budget = args.steps * step_flops(args, ref)
    ar_flops = step_flops(args, rows[0])
    for v in rows:
        v["flops_per_step"] = step_flops(args, v)
        if "split" in v:
            v["ar_steps"] = max(1, round(v["split"] * budget / ar_flops))
            v["steps"] = max(1, round((budget - v["ar_steps"] * ar_flops) / v["flops_per_step"]))
            v["train_flops"] = v["ar_steps"] * ar_flops + v["steps"] * v["flops_per_step"]
            continue
        v["steps"] = args.steps if args.budget == "steps" else max(1, round(budget / v["flops_per_step"]))
        v["train_flops"] = v["steps"] * v["flops_per_step"]


TRAIN_RECORD = "fidelity_train.json"  # in each run dir: what training that run cost, kept when it is reused


def train_variant(args, variant: dict, seed: int) -> dict:
    """Train (or reuse) the variant's run; a recipe variant first trains (or reuses) its split's AR run."""
    if "split" not in variant:
        return _train(args, f"{variant['name']}_s{seed}", variant["steps"], _overrides(args, variant, seed), variant)
    ar_variant = {"name": f"ar{round(variant['split'] * 100)}", "objective": "ar", "block_size": variant["block_size"]}
    ar = _train(args, f"{ar_variant['name']}_s{seed}", variant["ar_steps"], _overrides(args, ar_variant, seed),
                ar_variant)
    extra = [f"model.init_from={ar['run_dir']}", f"optim.lr={args.recipe_lr}",
             f"optim.min_lr={min(args.recipe_lr, 1e-4)}"]
    tidar = _train(args, f"{variant['name']}_s{seed}", variant["steps"],
                   _overrides(args, variant, seed) + extra, variant)
    return {**tidar, "train_wall_s": ar["train_wall_s"] + tidar["train_wall_s"], "ar_phase": ar}


def _train(args, run_name: str, steps: int, overrides: list[str], variant: dict) -> dict:
    run_dir = os.path.join(args.runs_dir, run_name)
    record_path = os.path.join(run_dir, TRAIN_RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("steps") == steps:  # already trained to this budget: reuse, keep its measured cost
            print(f"[fidelity] reusing {run_dir} (trained {steps} steps in {record['train_wall_s']:.0f} s)",
                  flush=True)
            return {"run_dir": run_dir, "train_wall_s": record["train_wall_s"], "reused": True,
                    "train_step_s_median": logged_step_time(run_dir), "train_log_tail": record.get("log_tail", []),
                    "load_average": record.get("load_average")}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--no-phases", "--config", args.config, "--run-dir",
           run_dir, "--steps", str(steps), f"checkpoint.every={steps}", f"logging.eval_every={steps}",
           "logging.progress=false", *overrides]
    print(f"[fidelity] training {run_name} ({steps} steps): {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        cli.fail(f"training {run_name} failed (exit {proc.returncode}): " + " | ".join(tail))
    tail = proc.stdout.strip().splitlines()[-8:]
    load = bc.load_average()
    bc.write_json(record_path, {"steps": steps, "train_wall_s": wall, "command": cmd[1:], "log_tail": tail,
                                "load_average": load})
    return {"run_dir": run_dir, "train_wall_s": wall, "reused": False, "train_step_s_median": logged_step_time(run_dir),
            "train_log_tail": tail, "load_average": load}


def logged_step_time(run_dir: str) -> float | None:
    """Median of the trainer's logged ``perf/step_time_s`` (TensorBoard), or None when it logged none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    if "perf/step_time_s" not in ea.Tags().get("scalars", []):
        return None
    return float(np.median([e.value for e in ea.Scalars("perf/step_time_s")]))


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
        cli.fail(f"cannot find the held-out data of {trained['run_dir']}; pass --data DIR")
    seq_len = args.eval_seq_len
    loss = heldout_ar_loss(bundle, data_dir, seq_len, args.eval_batch, args.eval_batches, variant["block_size"])
    prompts, source = bc.heldout_prompts(bundle.config, data_dir, args.prompts, args.prompt_len, args.seed)
    dec = decode_stats(bundle, prompts, variant["block_size"], args.new_tokens)
    # short horizon from many real contexts: the first 2B+1 tokens only, before a weak model's greedy
    # continuation can fall into a loop (loops are trivially easy to draft and inflate the long-run T/NFE)
    many, _ = bc.heldout_prompts(bundle.config, data_dir, args.short_prompts, args.prompt_len, args.seed)
    short = decode_stats(bundle, many, variant["block_size"], 2 * variant["block_size"] + 1)
    short["slot_acceptance"] = per_position_acceptance(short["accepted_length_hist"], variant["block_size"])
    return {**variant, **trained, "step": bundle.step, "num_params": bundle.config.num_params,
            "heldout": loss, "decode": dec, "decode_short": short, "prompts": source,
            "unigram_entropy": unigram_entropy(data_dir)}


_UNIGRAM: dict[str, float] = {}


def unigram_entropy(data_dir: str) -> float:
    """Held-out cross-entropy of the train-split unigram frequencies (the trainer's bar), once per data dir."""
    if data_dir not in _UNIGRAM:
        from tidar_jax.data import load_manifest
        from tidar_jax.train.loop import unigram_cross_entropy

        _UNIGRAM[data_dir] = unigram_cross_entropy(data_dir, load_manifest(data_dir))
    return _UNIGRAM[data_dir]


def parse_args(argv):
    p = cli.parser(__doc__)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"), help="training preset")
    p.add_argument("--steps", type=int, help="steps of TiDAR with the paper loss at the smallest B; the others get "
                   "the steps of equal FLOPs (default 200; --quick 60)")
    p.add_argument("--budget", choices=("flops", "steps"), default="flops",
                   help="equalise training FLOPs (default) or steps across variants")
    p.add_argument("--blocks", help="TiDAR block sizes (default 2,4,8)")
    p.add_argument("--options", default="paper",
                   help=f"draft-loss options of TiDAR from scratch to compare, from {','.join(OPTIONS)}")
    p.add_argument("--splits", default="0.5,0.8",
                   help="recipe variants: fraction of the budget's FLOPs spent on the AR phase, comma-separated "
                        "(each in (0, 1); '' = no recipe variants)")
    p.add_argument("--recipe-lr", type=float, default=7e-4,
                   help="peak learning rate of the recipe's TiDAR phase (default 7e-4; the AR phase uses the preset's)")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (run-to-run spread)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every variant (repeatable), e.g. --set data.seq_len=64")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "fidelity"))
    cli.add_shared(p, "data", data=dict(help="prepared data dir (default: the one each run trained on)"))
    p.add_argument("--eval-seq-len", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-batches", type=int)
    cli.add_shared(p, "prompts", "prompt_len")
    p.add_argument("--short-prompts", type=int, default=32,
                   help="held-out contexts for the short-horizon acceptance (2B+1 new tokens each)")
    cli.add_shared(p, "new_tokens", "seed", "quick", seed=dict(help="prompt sampling seed"))
    p.add_argument("--merge-json", metavar="A.json,B.json",
                   help="train nothing: merge the runs of earlier fidelity.json files (e.g. two halves of a study run "
                        "in parallel; the first file wins for a repeated variant and seed) and rewrite the results")
    cli.add_shared(p, "out")
    args = p.parse_args(argv)
    cli.fill_size_defaults(args, DEFAULTS, quick=QUICK)
    args.blocks = cli.parse_int_list(str(args.blocks), "--blocks")
    args.seeds = cli.parse_int_list(str(args.seeds), "--seeds", minimum=0)
    args.options = [o.strip() for o in args.options.split(",") if o.strip()]
    try:
        args.splits = [float(x) for x in str(args.splits).split(",") if x.strip()]
    except ValueError:
        cli.fail(f"--splits {args.splits!r}: must be comma-separated numbers in (0, 1)")
    if any(not 0 < x < 1 for x in args.splits):
        cli.fail(f"--splits {','.join(map(str, args.splits))}: every split must be in (0, 1)")
    if args.splits and args.budget == "steps":
        cli.fail("--splits with --budget steps: the recipe splits a FLOPs budget; use --budget flops or --splits ''")
    if not args.recipe_lr > 0:
        cli.fail(f"--recipe-lr {args.recipe_lr}: must be > 0")
    bad = [o for o in args.options if o not in OPTIONS]
    if bad or not args.options:
        cli.fail(f"--options {','.join(bad) or repr('')}: must be a comma-separated subset of {','.join(OPTIONS)}")
    cli.require_positive(args, ("steps", "eval_seq_len", "eval_batch", "eval_batches", "prompts", "prompt_len",
                                "new_tokens", "short_prompts"))
    if not os.path.isfile(args.config):
        cli.fail(f"--config {args.config}: no such file")
    for item in args.set:
        if "=" not in item:
            cli.fail(f"--set {item!r}: must be KEY=VALUE")
    args.runs_dir = os.path.abspath(args.runs_dir)
    return args


def merge(args) -> dict:
    runs, plan = {}, {}
    for path in args.merge_json.split(","):
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            cli.fail(f"--merge-json {path}: cannot read a fidelity.json ({e})")
        for r in part["runs"]:
            runs.setdefault((r["name"], r["seed"]), r)
        for p in part["plan"]:
            plan.setdefault(p["name"], p)
    order = {name: i for i, name in enumerate(
        ["ar"] + [v["name"] for b in sorted({p["block_size"] for p in plan.values()})
                  for v in variants([b], list(OPTIONS))[1:]])}
    rows = sorted(runs.values(), key=lambda r: (r["seed"], order.get(r["name"], 99)))
    args.seeds = sorted({r["seed"] for r in rows})
    args.blocks = sorted({r["block_size"] for r in rows if r["objective"] == "tidar"})
    args.options = [o for o in OPTIONS if any(r.get("option") == o for r in rows)]
    return _write(args, rows, sorted(plan.values(), key=lambda p: order.get(p["name"], 99)), final=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge_json:
        return merge(args)
    plan = variants(args.blocks, args.options, args.splits)
    try:
        assign_steps(args, plan)
    except Exception as e:  # a bad --set or config: one line
        cli.fail(f"cannot build the study's configs: {e}")
    rows = []
    for seed in args.seeds:  # seed-major: every variant of one seed before the next seed
        for v in plan:
            trained = train_variant(args, v, seed)
            rows.append({**evaluate(args, v, trained), "seed": seed})
            r = rows[-1]
            print(f"[fidelity] {v['name']} seed {seed}: held-out AR loss {r['heldout']['ar_loss']:.4f}, diff loss "
                  f"{r['heldout']['diff_loss']:.4f}, lossless T/NFE {r['decode']['tokens_per_nfe']:.2f} "
                  f"(B={r['decode']['block_size']}), E[acc] real {r['decode_short']['mean_accepted']:.2f}, "
                  f"slot acceptance {r['decode_short']['slot_acceptance']}, train {r['train_wall_s']:.0f} s",
                  flush=True)
            _write(args, rows, plan)
    return _write(args, rows, plan, final=True)


def _write(args, rows, plan, final=False) -> dict:
    """Results so far (after every run, so an interrupted study still leaves its table)."""
    for r in rows:
        ar = next((a for a in rows if a["objective"] == "ar" and a["seed"] == r["seed"]), None)
        r["ar_loss_minus_ar_only"] = r["heldout"]["ar_loss"] - ar["heldout"]["ar_loss"] if ar else None
    summary = summarize(rows)
    tidar = [s for s in summary if s["objective"] == "tidar"]
    checks = {"max_ar_loss_gap_nats": max((s["ar_loss_gap"] for s in tidar if s["ar_loss_gap"] is not None),
                                          default=None),
              "complete": final}
    result = {"benchmark": "fidelity", "machine": bc.machine_info(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "plan": [{k: v[k] for k in ("name", "objective", "block_size", "steps", "flops_per_step", "train_flops",
                                          "split", "ar_steps") if k in v} for v in plan],
              "runs": rows, "summary": summary, "checks": checks}
    bc.write_json(os.path.join(args.out, "fidelity.json"), result)
    bc.write_text(os.path.join(args.out, "fidelity.md"), markdown(result))
    if final:
        print(markdown(result), flush=True)
    return result


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(max(values) - min(values)) if len(values) > 1 else None)


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant over seeds: mean and spread (max - min) of every figure, and the ratios to the paper variant
    of the same B and to the AR-only model."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    out = []
    for name in names:
        rs = [r for r in rows if r["name"] == name]
        first = rs[0]
        entry = {"name": name, "objective": first["objective"], "block_size": first["block_size"],
                 "option": first.get("option", "-"), "steps": first["steps"], "seeds": [r["seed"] for r in rs],
                 "split": first.get("split"), "ar_steps": first.get("ar_steps"),
                 "unigram_entropy": first.get("unigram_entropy")}
        for key, get in (("ar_loss", lambda r: r["heldout"]["ar_loss"]),
                         ("diff_loss", lambda r: r["heldout"].get("diff_loss")),
                         ("tnfe", lambda r: r["decode"]["tokens_per_nfe"]),
                         ("e_accepted_real", lambda r: r["decode_short"]["mean_accepted"]),
                         ("distinct4", lambda r: r["decode"]["distinct_4gram_fraction"]),
                         ("ar_loss_gap", lambda r: r["ar_loss_minus_ar_only"])):
            entry[key], entry[key + "_spread"] = _mean_spread([get(r) for r in rs])
        hist: dict[str, int] = {}
        for r in rs:
            for k, v in r["decode_short"]["accepted_length_hist"].items():
                hist[k] = hist.get(k, 0) + int(v)
        entry["accepted_hist_real"] = hist
        entry["slot_acceptance"] = per_position_acceptance(hist, first["block_size"])
        entry["train_wall_s"] = float(np.mean([r["train_wall_s"] for r in rs]))
        out.append(entry)
    for e in out:
        paper = next((p for p in out if p["objective"] == "tidar" and p["block_size"] == e["block_size"]
                      and p["option"] == "paper"), None)
        if e["objective"] == "tidar" and paper:
            e["tnfe_vs_paper"] = e["tnfe"] / paper["tnfe"]
            e["e_accepted_vs_paper"] = e["e_accepted_real"] / paper["e_accepted_real"]
            e["ar_loss_vs_paper"] = e["ar_loss"] / paper["ar_loss"] - 1.0
    return out


def _pm(value, spread, fmt="{:.3f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value) + (f" ±{spread / 2:.3f}" if spread else "")


def _below_unigram(entry) -> str:
    if entry.get("unigram_entropy") is None or entry["ar_loss"] is None:
        return "-"
    return f"{entry['unigram_entropy'] - entry['ar_loss']:.3f}"


def _ratio(value, fmt="{:.2f}x") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(result) -> str:
    st = result["settings"]
    m = result["machine"]
    rows, summary = result["runs"], result["summary"]
    cmd = (f"python benchmarks/fidelity.py --steps {st['steps']} --budget {st['budget']} --blocks "
           f"{','.join(map(str, st['blocks']))} --options {','.join(st['options'])} --splits "
           f"{','.join(map(str, st.get('splits', [])))} --recipe-lr {st.get('recipe_lr')} --seeds "
           f"{','.join(map(str, st['seeds']))}" + "".join(f" --set {s}" for s in st["set"])
           + (" --quick" if st["quick"] else ""))
    first = rows[0] if rows else None
    lines = ["# Fidelity study: AR-only, TiDAR from scratch and AR-then-TiDAR at equal training compute", "",
             f"Command: `{cmd}`", "",
             f"Machine: {m['cpu_model']}, {m['cpu_threads']} CPUs, load average at the end "
             f"{m['load_average_1_5_15']}, jax {m['versions']['jax']} on {m['jax_backend']}."
             + ("" if result["checks"]["complete"] else " **Partial: the study was still running.**"), ""]
    if first:
        budget = ("equal training FLOPs (analytic matmul count per step x steps)" if st["budget"] == "flops"
                  else "equal steps")
        unigram = first.get("unigram_entropy")
        lines += [f"Every variant: same model ({first['num_params'] / 1e6:.2f}M params), data order and batch; "
                  f"budget: {budget}. Seeds {', '.join(map(str, st['seeds']))}: figures are means, ± half the "
                  f"spread (max - min) over seeds. Held-out AR-mode and diffusion loss over "
                  f"{first['heldout']['tokens']} held-out tokens (windows of {st['eval_seq_len']})"
                  + (f"; held-out unigram entropy **{unigram:.3f}** nats/token" if unigram else "") + ". "
                  f"T/NFE from **lossless** greedy TiDAR decoding (beta=1, slot0=verifier; the output is the AR "
                  f"model's) of {st['prompts']} held-out prompts ({st['prompt_len']} tokens) for {st['new_tokens']} "
                  f"new tokens; E[accepted] from real contexts: tokens per step over the first 2B+1 tokens after "
                  f"each of {st['short_prompts']} held-out contexts, with its accepted-length histogram; slot "
                  "acceptance: for draft slot i = 1..B-1, how often the draft equalled the verifier's token when "
                  "slots 1..i-1 were accepted (from the same histogram). recipe_bB_arP: P% of the FLOPs on an AR "
                  f"run, the rest on TiDAR from it at lr {st.get('recipe_lr')} (fresh optimizer).", ""]
    lines += ["| variant | B | steps (AR + TiDAR) | train GFLOPs | held-out AR loss | below unigram | vs AR-only | "
              "diff loss | lossless T/NFE | E[accepted] real | slot acceptance (1..B-1) | accepted-length hist (real) | "
              "distinct 4-grams | train wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plan = {p["name"]: p for p in result["plan"]}
    for e in summary:
        b = e["block_size"] if e["objective"] == "tidar" else f"- ({e['block_size']})"
        gap = _pm(e["ar_loss_gap"], e["ar_loss_gap_spread"], "{:+.3f}") if e["objective"] == "tidar" else "—"
        hist = " ".join(f"{k}:{v}" for k, v in sorted(e["accepted_hist_real"].items(), key=lambda kv: int(kv[0])))
        steps = (f"{e['ar_steps']} + {e['steps']}" if e.get("ar_steps") else
                 f"{e['steps']} + 0" if e["objective"] == "ar" else f"0 + {e['steps']}")
        slots = (" / ".join("-" if a is None else f"{a:.2f}" for a in e["slot_acceptance"])
                 if e["objective"] == "tidar" else "-")
        option = "" if e["option"] in ("-", "paper") else f" ({e['option']})"
        lines.append(
            f"| {e['name']}{option} | {b} | {steps} | {plan[e['name']]['train_flops'] / 1e9:.0f} | "
            f"{_pm(e['ar_loss'], e['ar_loss_spread'])} | {_below_unigram(e)} | {gap} | "
            f"{_pm(e['diff_loss'], e['diff_loss_spread'])} | {_pm(e['tnfe'], e['tnfe_spread'], '{:.2f}')} | "
            f"{_pm(e['e_accepted_real'], e['e_accepted_real_spread'], '{:.2f}')} | {slots} | {hist} | "
            f"{e['distinct4']:.2f} | {e['train_wall_s']:.0f} |")
    c = result["checks"]
    lines += ["", "- Below unigram: the held-out unigram entropy minus the AR-mode loss. Near 0, the model predicts no "
              "better than token frequencies: its greedy output repeats the most frequent tokens, which any drafter "
              "matches, so its T/NFE and acceptance say nothing about drafting (distinct 4-grams near 0 too)."]
    lines += ["",
              "- Largest AR-mode loss gap of a TiDAR variant to the AR-only model: "
              f"**{_pm(c['max_ar_loss_gap_nats'], None, '{:+.4f}')} nats/token** "
              "(positive = TiDAR worse).",
              "- The AR-only row is decoded with TiDAR at the smallest B as a control (its drafts are untrained); its "
              "diffusion loss is that of its untrained mask half.",
              "- A recipe's AR run is shared by every B of its split and seed; its wall time is counted in each "
              "recipe row that uses it.",
              "- T/NFE over long continuations is inflated when a continuation loops (low distinct 4-grams); "
              "E[accepted] from real contexts is the honest acceptance figure.",
              "- Train wall s: the `train.py` call (start, compile, training, eval, checkpoint) on a shared machine.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
