"""TiDAR vs our own AR decode: block sizes x batch sizes x {lossless, trust-diff}, all interleaved in one run.

    python -m benchmarks.decode_modes --checkpoint RUN_DIR [--quick] [--out benchmarks/results]

Modes (greedy): "lossless" = beta 1, slot0 "verifier" (output identical to greedy AR); "trust-diff" = beta 0,
slot0 "diffusion" (the authors' default: the verifier is the diffusion slot-0 logits and the next block starts with
the diffusion argmax). For every (mode, B, batch): tokens/s, T/NFE, speedup over AR at the same batch, and
speedup / T/NFE (how much of the T/NFE gain survives the bigger forward). Prompts are held-out windows.
Writes ``decode_modes.json``; ``benchmarks/decode_speed.py`` (decode engineer) adds the selective-LM-head figure.
"""

from __future__ import annotations

import os

from benchmarks import common as bc
from benchmarks import cli

MODES = {"lossless": dict(beta=1.0, slot0="verifier"), "trust-diff": dict(beta=0.0, slot0="diffusion")}
DEFAULTS = {"blocks": "4,8,16", "batches": "1,4", "rounds": 5, "new_tokens": 64, "prompt_len": 64, "preset": "m38"}
QUICK = {"blocks": "4,8", "batches": "1,4", "rounds": 3, "new_tokens": 32, "prompt_len": 32, "preset": "small"}
TINY = {"blocks": "2", "batches": "1", "rounds": 1, "new_tokens": 6, "prompt_len": 8, "preset": "tiny"}


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "checkpoint", "preset", "tiny", "quick")
    p.add_argument("--blocks", help="TiDAR block sizes (default 4,8,16)")
    p.add_argument("--batches", help="batch sizes (default 1,4)")
    p.add_argument("--modes", default="lossless,trust-diff", help="subset of lossless,trust-diff")
    cli.add_shared(p, "rounds", "new_tokens", "prompt_len", "data", "seed", "out")
    args = p.parse_args(argv)
    cli.fill_size_defaults(args, DEFAULTS, quick=QUICK, tiny=TINY)
    args.blocks = cli.parse_int_list(str(args.blocks), "--blocks")
    args.batches = cli.parse_int_list(str(args.batches), "--batches")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        cli.fail(f"--modes={','.join(args.modes)}: must be a non-empty subset of {','.join(MODES)}")
    cli.require_positive(args, ("rounds", "new_tokens", "prompt_len"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    bundle, trained = bc.load_model(args.checkpoint, args.preset, args.seed)
    from tidar_jax.decode import Decoder

    dec = Decoder.from_bundle(bundle)
    data_dir = bc.find_data_dir(args.checkpoint, args.data)
    prompts, source = bc.heldout_prompts(bundle.config, data_dir, max(args.batches), args.prompt_len, args.seed)
    common = dict(max_new_tokens=args.new_tokens, eos_token_id=None)
    configs = {}
    for n in args.batches:
        configs[("ar", 1, n)] = dict(mode="ar", **common)
        for mode in args.modes:
            for b in args.blocks:
                configs[(mode, b, n)] = dict(mode="tidar", block_size=b, allow_untrained_block_size=True,
                                             **MODES[mode], **common)
    last = {}

    def candidate(key):
        def call():
            last[key] = dec.generate(prompts[:key[2]], **configs[key])
            return last[key]
        return call

    cands = {f"{m}/B={b}/N={n}": candidate((m, b, n)) for (m, b, n) in configs}
    times = bc.interleaved(cands, rounds=args.rounds, warmup=1, sync=lambda r: r)
    rows = []
    for (m, b, n), name in zip(configs, cands):
        st = bc.stats(times[name])
        s = last[(m, b, n)].stats
        tokens = sum(s["new_tokens"])
        rows.append({"mode": m, "block_size": b, "batch": n, "wall_s_p25": st["p25"], "wall_s_median": st["median"],
                     "tokens": tokens, "tokens_per_s": tokens / st["p25"], "nfe": s["nfe"],
                     "tokens_per_nfe": s["tokens_per_nfe"], "mean_accepted": s["mean_accepted"],
                     "ms_per_forward": st["p25"] * 1e3 / s["nfe"], "accepted_length_hist": s["accepted_length_hist"],
                     "equal_to_ar": None})
    ar = {r["batch"]: r for r in rows if r["mode"] == "ar"}
    for r in rows:
        base = ar[r["batch"]]
        r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["speedup_over_tnfe"] = r["speedup_vs_ar"] / r["tokens_per_nfe"]
        r["forward_cost_vs_ar"] = r["ms_per_forward"] / base["ms_per_forward"]
        r["equal_to_ar"] = last[(r["mode"], r["block_size"], r["batch"])].tokens == \
            last[("ar", 1, r["batch"])].tokens
    result = {"benchmark": "decode_modes", "machine": bc.machine_info(), "model": bc.model_description(bundle, trained),
              "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "prompts": source},
              "warning": None if trained else bc.RANDOM_MODEL_WARNING, "rows": rows}
    bc.write_json(os.path.join(args.out, "decode_modes.json"), result)
    print(report(result), flush=True)
    return result


def report(result) -> str:
    lines = [result["warning"]] if result["warning"] else []
    lines.append(f"{'mode':<11}{'B':>4}{'N':>4}{'tok/s':>10}{'T/NFE':>8}{'speedup':>9}{'sp/TNFE':>9}"
                 f"{'fwd cost':>10}  same as AR")
    for r in result["rows"]:
        lines.append(f"{r['mode']:<11}{r['block_size']:>4}{r['batch']:>4}{r['tokens_per_s']:>10.1f}"
                     f"{r['tokens_per_nfe']:>8.2f}{r['speedup_vs_ar']:>8.2f}x{r['speedup_over_tnfe']:>9.2f}"
                     f"{r['forward_cost_vs_ar']:>9.2f}x  {r['equal_to_ar']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
