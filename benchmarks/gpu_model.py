#!/usr/bin/env python
"""ESTIMATES of the code as it stands on NVIDIA GPUs: the cost model (tidar_jax/analysis/cost_model.py) applied to
the programs XLA:GPU compiles here for an H100 (deviceless: no GPU is used or needed). ``step_s`` / ``mfu`` are the
ceiling (datasheet peaks); ``expected_*`` beside them derate the peaks by public measurements (docs/estimates.md).
A decode step's figures include the generation loop's host round trip.

    nice -n 10 python -m benchmarks.gpu_model [--shapes qwen2.5-1.5b qwen3-8b] [--no-train] [--no-decode]

* train: the real train step of configs/qwen2.5-1.5b-tidar.yaml and configs/qwen3-8b-tidar.yaml on ``h100x8``
  (``train.py --plan --target h100x8``): XLA:GPU's memory per device, the estimated step time and MFU, launches
  per micro-batch.
* decode: one AR step and one TiDAR step (B = 4, 8, 16) at batch 1 and 8, live context 1024 and 4096, for the
  Qwen2.5-1.5B and Qwen3-8B shapes in bf16, compiled for an H100 and estimated with the H100's and the H200's
  figures (same SM count and compute capability: XLA builds the same program; only bandwidth and memory differ);
  the TiDAR/AR step ratio and the speedup projected at the paper's tokens per forward (T/NFE 7.45 at 1.5B, 8.25 at
  8B, its B=16 figures) beside the paper's measured 4.71x and 5.91x.

Every figure is an estimate of a model whose assumptions (peaks, bandwidth, launch and host round-trip costs, the
trip count assumed for data-dependent loops) are written beside it; the accelerator suite records the same
estimate beside its measurements so the first GPU run calibrates it. Writes benchmarks/results/gpu_estimates.json
and .md, and tidar_jax/analysis/decode_step_ratios.json (TiDAR/AR step ratio per target, shape and B).
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import cli

from tidar_jax.presets import PAPER_DECODE as PAPER  # jax-free: the paper's T/NFE and speedups

TRAIN_CONFIGS = {"qwen2.5-1.5b": "configs/qwen2.5-1.5b-tidar.yaml", "qwen3-8b": "configs/qwen3-8b-tidar.yaml"}
CHIPS_ESTIMATED = ("h100", "h200")


def decode_grid(shapes, batches, contexts, blocks, page: int, max_new: int, log) -> list[dict]:
    from tidar_jax import targets
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.decode_plan import compile_decode, model_config_for_plan, program_estimate

    devices = targets.target_devices("h100")
    rows = []
    for shape in shapes:
        cfg = model_config_for_plan(shape, None, "bfloat16")
        for batch in batches:
            for context in contexts:
                programs = {}
                t0 = time.perf_counter()
                programs.update(compile_decode(cfg, devices, batch=batch, block_size=1, context=context,
                                               max_new_tokens=max_new, cache_page=page, modes=("ar",),
                                               with_prefill=False))
                for b in blocks:
                    tidar = compile_decode(cfg, devices, batch=batch, block_size=b, context=context,
                                           max_new_tokens=max_new, cache_page=page, modes=("tidar",),
                                           with_prefill=False)
                    programs[f"tidar step B={b}"] = tidar["tidar step"]
                log(f"{shape} batch {batch} context {context}: {len(programs)} steps compiled in "
                    f"{time.perf_counter() - t0:.0f} s")
                for name, prog in programs.items():
                    mode = "ar" if name.startswith("ar") else "tidar"
                    b = 1 if mode == "ar" else int(name.split("B=")[1])
                    s = prog.summary(cfg.num_layers)
                    for chip in CHIPS_ESTIMATED:
                        est = estimate(prog.program, targets.CHIPS[chip], prog.assumed_trips,
                                       live_cache_slots=context)
                        levels = program_estimate(prog, targets.CHIPS[chip], graph=False, live_cache_slots=context)
                        rows.append({
                            "target": chip, "shape": shape, "batch": batch, "context": context, "mode": mode,
                            "block_size": b, "step_s": levels["ceiling_s"], "expected_step_s": levels["expected_s"],
                            "outer_loop_round_trip_s": levels["outer_loop_round_trip_s"], "launches": est.launches,
                            "launches_per_layer": est.launches / cfg.num_layers,
                            "host_round_trips": est.host_round_trips, "round_trip_s": est.round_trip_time_s,
                            "launch_s": est.launch_time_s, "flops": est.flops, "bytes": est.bytes,
                            "entry_kernels": s["entry_kernels"], "dynamic_loops": s["dynamic_loops"],
                            "memory_bytes": s["memory"].get("total_bytes"), "assumptions": est.assumptions.line()})
    _derive(rows)
    return rows


def _derive(rows):
    """Per TiDAR row: the step ratio to the AR step of the same target/shape/batch/context, tokens/s and the
    speedup projected at the paper's T/NFE; per AR row: tokens/s."""
    ar = {(r["target"], r["shape"], r["batch"], r["context"]): r for r in rows if r["mode"] == "ar"}
    for r in rows:
        base = ar[(r["target"], r["shape"], r["batch"], r["context"])]
        r["tokens_per_s"] = r["batch"] / r["step_s"] if r["mode"] == "ar" else None
        # host round trips per decoded token (per row): a step emits one token per row for AR
        r["round_trips_per_token"] = r["host_round_trips"] / (1 if r["mode"] == "ar" else
                                                              PAPER[r["shape"]]["tokens_per_nfe"])
        if r["mode"] == "tidar":
            tpn = PAPER[r["shape"]]["tokens_per_nfe"]
            r["tidar_over_ar_step"] = r["step_s"] / base["step_s"]
            r["tokens_per_nfe_assumed"] = tpn
            r["tokens_per_s"] = r["batch"] * tpn / r["step_s"]
            r["projected_speedup"] = tpn / r["tidar_over_ar_step"]
            if "expected_step_s" in r:
                r["expected_tidar_over_ar_step"] = r["expected_step_s"] / base["expected_step_s"]
                r["expected_projected_speedup"] = tpn / r["expected_tidar_over_ar_step"]
            r["paper_speedup"] = PAPER[r["shape"]]["speedup"]


def train_rows(shapes, target_name: str, log, overrides=()) -> list[dict]:
    from tidar_jax.targets import parse_target
    from tidar_jax.train.config import load_config
    from tidar_jax.analysis.train_plan import run_plan

    target = parse_target(target_name)
    rows = []
    for shape in shapes:
        cfg = load_config(TRAIN_CONFIGS[shape], list(overrides))
        t0 = time.perf_counter()
        r = run_plan(cfg, target=target)
        log(f"train {shape} on {target_name}: compiled and estimated in {time.perf_counter() - t0:.0f} s")
        e, p, a = r["estimate"], r["per_device"], r["analytic_per_device"]
        rows.append({"target": target_name, "shape": shape, "config": TRAIN_CONFIGS[shape],
                     "overrides": list(overrides), "micro_batch_per_device": cfg.data.global_batch //
                     (cfg.optim.grad_accum * target.count), "grad_accum": cfg.optim.grad_accum,
                     "remat": cfg.model.remat, "attention": r["config"]["attention"],
                     "xla_bytes_per_device": p["total_bytes"], "analytic_bytes_per_device": a["total_bytes"],
                     "step_s": e["ceiling_s"], "mfu": e["mfu_ceiling"], "tokens_per_s": e["tokens_per_s_ceiling"],
                     "expected_step_s": e["expected_s"], "expected_mfu": e["mfu_expected"],
                     "attention_share": e["attention_share_ceiling"],
                     "expected_attention_share": e["attention_share_expected"],
                     "launches": e["launches"], "launches_per_micro_batch": e["launches_per_micro_batch"],
                     "launch_s": e["launch_time_s"], "compute_bound_s": e["compute_bound_time_s"],
                     "memory_bound_s": e["memory_bound_time_s"], "collective_s": e["collective_time_s"],
                     "model_flops": e["model_flops"], "counted_flops_per_device": e["flops_per_device"],
                     "assumptions": e["assumptions_line"], "compile_seconds": r["compile_seconds"]})
    return rows


def decode_summary(rows: list[dict]) -> list[str]:
    """One line per (target, shape, batch, context): AR vs TiDAR at the paper's B=16."""
    ar = {(r["target"], r["shape"], r["batch"], r["context"]): r for r in rows if r["mode"] == "ar"}
    out = ["## Decode summary: AR vs TiDAR B=16 (ESTIMATES)", "",
           "| target | shape | batch | context | AR step ms | AR tokens/s | TiDAR step ms | TiDAR/AR step | TiDAR "
           "tokens/s at the paper's T/NFE | projected speedup | paper | host round trips per step (per token of a "
           "row, AR) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] != "tidar" or r["block_size"] != 16:
            continue
        a = ar[(r["target"], r["shape"], r["batch"], r["context"])]
        out.append(f"| {r['target']} | {r['shape']} | {r['batch']} | {r['context']} | {1e3 * a['step_s']:.1f} | "
                   f"{a['tokens_per_s']:.0f} | {1e3 * r['step_s']:.1f} | {r['tidar_over_ar_step']:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {r['projected_speedup']:.2f}x | {r['paper_speedup']}x | "
                   f"{a['host_round_trips']} |")
    return out + [""]


def _part_command(result: dict, part: str) -> list[str]:
    """The command of rows kept from an earlier run by ``--merge`` (none when this run made them)."""
    if result.get(f"{part}_command"):
        return [f"These rows: `{result[f'{part}_command']}` ({result[f'{part}_when']}).", ""]
    return []


def to_markdown(result: dict) -> str:
    gib = 1024 ** 3
    lines = ["# GPU estimates of the code as it stands (cost model, not measurements)", "",
             f"Command: `{result['command']}` ({result['when']}). Programs compiled by XLA:GPU on this CPU for an "
             "H100 (deviceless); times are the cost model's estimates (tidar_jax/analysis/cost_model.py).", ""]
    if result.get("train"):
        lines += ["## Train step (8 GPUs)", ""] + _part_command(result, "train") + [
                  "| shape | target | micro-batch/dev x accum | remat | attention | XLA:GPU GiB/dev | analytic GiB/dev "
                  "| est. step s | est. MFU | launches / micro-batch | launch s | collectives s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["train"]:
            lines.append(f"| {r['shape']} | {r['target']} | {r['micro_batch_per_device']} x {r['grad_accum']} | "
                         f"{r['remat']} | {r['attention']} | {r['xla_bytes_per_device'] / gib:.1f} | "
                         f"{r['analytic_bytes_per_device'] / gib:.1f} | {r['step_s']:.1f} | {100 * r['mfu']:.1f}% | "
                         f"{r['launches_per_micro_batch']:,.0f} | {r['launch_s']:.1f} | {r['collective_s']:.2f} |")
        lines += ["", f"Assumptions: {result['train'][0]['assumptions']}", ""]
    if result.get("decode"):
        lines += _part_command(result, "decode") + decode_summary(result["decode"])
        lines += ["## Decode steps (one GPU, bf16)", "",
                  "| target | shape | batch | context | mode | B | est. step ms | launches (per layer) | host round "
                  "trips | est. tokens/s | TiDAR/AR step | projected speedup (paper) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            tidar = r["mode"] == "tidar"
            lines.append(
                f"| {r['target']} | {r['shape']} | {r['batch']} | {r['context']} | {r['mode']} | {r['block_size']} | "
                f"{1e3 * r['step_s']:.2f} | {r['launches']} ({r['launches_per_layer']:.1f}) | {r['host_round_trips']} "
                f"| {r['tokens_per_s']:.0f} | {r['tidar_over_ar_step']:.2f} | " if tidar else
                f"| {r['target']} | {r['shape']} | {r['batch']} | {r['context']} | {r['mode']} | 1 | "
                f"{1e3 * r['step_s']:.2f} | {r['launches']} ({r['launches_per_layer']:.1f}) | {r['host_round_trips']} "
                f"| {r['tokens_per_s']:.0f} | 1 | |")
            if tidar:
                lines[-1] += f"{r['projected_speedup']:.2f}x ({r['paper_speedup']}x) |"
        first = result["decode"][0]["assumptions"]
        lines += ["", "TiDAR tokens/s and the projected speedup assume the paper's tokens per forward (7.45 at 1.5B, "
                  "8.25 at 8B, measured at B=16) at every B; a smaller B accepts fewer.", "",
                  f"Assumptions (first H100 row; H200 rows use 4.8 TB/s; a data-dependent loop runs ceil(context / "
                  f"128) iterations, the cache pages up to the live length: 8 at 1024, 32 at 4096): {first}", ""]
    return "\n".join(lines)


def write_ratios(result: dict, path: str) -> None:
    """tidar_jax/analysis/decode_step_ratios.json: the ESTIMATED TiDAR/AR step-time ratio per (target, shape, B),
    nested by batch and context and as flat rows (the demo reads it)."""
    ratios, rows = {}, []
    for r in result["decode"]:
        if r["mode"] != "tidar":
            continue
        ratios.setdefault(r["target"], {}).setdefault(r["shape"], {}).setdefault(
            f"batch{r['batch']}_context{r['context']}", {})[str(r["block_size"])] = r["tidar_over_ar_step"]
        rows.append({k: r[k] for k in ("target", "shape", "batch", "context", "block_size", "tidar_over_ar_step",
                                       "step_s", "projected_speedup", "paper_speedup", "tokens_per_nfe_assumed")})
    with open(path, "w") as f:
        json.dump({"what": "ESTIMATED TiDAR step time / AR step time (cost model of the XLA:GPU program, "
                           "benchmarks/gpu_model.py; not a measurement); ratios: target -> shape -> "
                           "batch/context -> block size B", "command": result["command"],
                   "assumptions": result["decode"][0]["assumptions"], "ratios": ratios, "rows": rows,
                   "paper": PAPER}, f, indent=1)


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=list(PAPER))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--page", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--train-target", default="h100x8")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--train-overrides", nargs="*", default=[],
                   help="dotted config overrides for the train rows (e.g. optim.grad_accum=16 to size the presets)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gpu_estimates.json")
    p.add_argument("--ratio-out", default="tidar_jax/analysis/decode_step_ratios.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows this run does not make (train or decode) from the existing --out file, with "
                        "their command (e.g. --no-decode --merge refreshes only the train rows)")
    p.add_argument("--from-json", default=None,
                   help="re-render the markdown and the ratio file from an earlier --out JSON (no compiling)")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        with open(os.path.splitext(args.from_json)[0] + ".md", "w") as f:
            f.write(to_markdown(result))
        if result.get("decode"):
            write_ratios({**result, "command": result.get("decode_command", result["command"])}, args.ratio_out)
        print(to_markdown(result))
        return 0

    from tidar_jax.config import ConfigError
    from tidar_jax.presets import MODEL_SHAPES
    from tidar_jax.targets import CHIPS, parse_target, prepare_environment

    bad = [s for s in args.shapes if s not in MODEL_SHAPES]
    if bad:
        raise SystemExit(f"--shapes {bad[0]!r}: must be among {', '.join(MODEL_SHAPES)}")
    prepare_environment(parse_target("h100"))  # before jax initialises

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"command": "python -m benchmarks.gpu_model " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "estimates_not_measurements": True,
              "chips": {c: {k: v for k, v in vars(CHIPS[c]).items() if not isinstance(v, tuple)}
                        for c in CHIPS_ESTIMATED}}
    try:
        if not args.no_train:
            result["train"] = train_rows(args.shapes, args.train_target, log, args.train_overrides)
        if not args.no_decode:
            result["decode"] = decode_grid(args.shapes, args.batches, args.contexts, args.blocks, args.page,
                                           args.max_new_tokens, log)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        for part in ("train", "decode"):
            if part not in result and part in old:
                result[part] = old[part]
                result[f"{part}_command"] = old.get(f"{part}_command", old["command"])
                result[f"{part}_when"] = old.get(f"{part}_when", old["when"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(to_markdown(result))
    if result.get("decode") and not result.get("decode_command"):  # kept rows: their ratio file stands
        write_ratios(result, args.ratio_out)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
