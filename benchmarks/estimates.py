#!/usr/bin/env python
"""The published accelerator figures at both levels, ceiling and expected (docs/estimates.md): ESTIMATES of the
programs XLA compiles here for each target (deviceless: no GPU or TPU is used or needed).

    nice -n 10 python -m benchmarks.estimates [--shapes qwen2.5-1.5b] [--no-train] [--targets h100 v5e-4 ...]

* train: the real train step of configs/qwen2.5-1.5b-tidar.yaml (and the 8B's with ``--shapes``) on ``h100x8``
  (``train.py --plan --target h100x8``): step time, MFU and the attention kernels' share, ceiling and expected.
* decode: the AR step and the TiDAR step (B = 16, all groups) at batch 1 and live context 1024 in bf16, for each
  target (``decode.py --plan --estimate``'s figures, steps only); on a GPU as one CUDA graph, each step with the
  generation loop's host round trip; the H200 is the H100's program (same SMs and compute capability: XLA builds the
  same program) with the H200's figures. The TiDAR/AR step ratio and the speedup projected at the paper's tokens
  per forward, at both levels, beside the paper's measured speedup.

Writes benchmarks/results/estimates.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import cli

from tidar_jax.presets import PAPER_DECODE as PAPER

TRAIN_CONFIGS = {"qwen2.5-1.5b": "configs/qwen2.5-1.5b-tidar.yaml", "qwen3-8b": "configs/qwen3-8b-tidar.yaml"}
DEFAULT_TARGETS = ("h100", "h200", "v5e-4", "v5p-8", "v6e-4")
LEVELS = ("ceiling", "expected")


def train_rows(shapes, target_name: str, log) -> list[dict]:
    from tidar_jax.analysis.train_plan import run_plan
    from tidar_jax.targets import parse_target
    from tidar_jax.train.config import load_config

    target = parse_target(target_name)
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        r = run_plan(load_config(TRAIN_CONFIGS[shape]), target=target)
        log(f"train {shape} on {target_name}: {time.perf_counter() - t0:.0f} s")
        e = r["estimate"]
        rows.append({"shape": shape, "target": target_name, "config": TRAIN_CONFIGS[shape],
                     "attention": r["config"]["attention"], "assumptions": e["assumptions_line"],
                     **{f"{k}_{level}": e[f"{k}_{level}"] for k in ("mfu", "attention_share", "tokens_per_s")
                        for level in LEVELS},
                     **{f"step_s_{level}": e[f"{level}_s"] for level in LEVELS}})
    return rows


def decode_rows(shapes, target_names, block: int, context: int, log) -> list[dict]:
    from tidar_jax import targets
    from tidar_jax.analysis.decode_plan import compile_decode, model_config_for_plan, program_estimate

    rows = []
    compiled = {}  # (shape, program target) -> programs
    for shape in shapes:
        cfg = model_config_for_plan(shape, None, "bfloat16")
        tpn = PAPER[shape]["tokens_per_nfe"]
        for name in target_names:
            target = targets.parse_target(name)
            source = "h100" if target.chip.name == "h200" else name  # the same XLA:GPU program
            if (shape, source) not in compiled:
                t0 = time.perf_counter()
                compiled[shape, source] = compile_decode(cfg, targets.target_devices(targets.parse_target(source)),
                                                         batch=1, block_size=block, context=context,
                                                         with_prefill=False)
                log(f"{shape} steps for {source}: compiled in {time.perf_counter() - t0:.0f} s")
            programs = compiled[shape, source]
            steps = {mode: program_estimate(programs[f"{mode} step"], target.chip, graph=True,
                                            live_cache_slots=context) for mode in ("ar", "tidar")}
            row = {"shape": shape, "target": name, "block_size": block, "context": context, "batch": 1,
                   "tokens_per_nfe": tpn, "paper_speedup": PAPER[shape]["speedup"],
                   "assumptions": steps["tidar"]["assumptions_line"]}
            for level in LEVELS:
                ar, tidar = steps["ar"][f"{level}_s"], steps["tidar"][f"{level}_s"]
                row.update({f"ar_step_s_{level}": ar, f"tidar_step_s_{level}": tidar,
                            f"tidar_over_ar_{level}": tidar / ar, f"projected_speedup_{level}": tpn * ar / tidar})
            if "xla_s" in steps["tidar"]:
                row.update({f"xla_{mode}_step_s": steps[mode]["xla_s"] for mode in steps})
            rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    lines = ["# Published figures at both levels: ceiling and expected (ESTIMATES, not measurements)", "",
             f"Command: `{result['command']}` ({result['when']}). Ceiling: datasheet peaks; expected: peaks derated "
             "by public measurements per kernel class ([docs/estimates.md](../../docs/estimates.md) gives each "
             "source).", ""]
    if result.get("train"):
        lines += ["## Train step", "",
                  "| shape | target | attention | step s ceiling / expected | MFU ceiling / expected | attention share "
                  "ceiling / expected |", "|---|---|---|---|---|---|"]
        for r in result["train"]:
            lines.append(f"| {r['shape']} | {r['target']} | {r['attention']} | {r['step_s_ceiling']:.1f} / "
                         f"{r['step_s_expected']:.1f} | {100 * r['mfu_ceiling']:.1f}% / {100 * r['mfu_expected']:.1f}% "
                         f"| {100 * r['attention_share_ceiling']:.1f}% / {100 * r['attention_share_expected']:.1f}% |")
        lines += ["", f"Assumptions: {result['train'][0]['assumptions']}", ""]
    if result.get("decode"):
        lines += ["## Decode steps (batch 1, B = 16, context 1024, bf16; GPU: one CUDA graph plus the generation "
                  "loop's host round trip)", "",
                  "| shape | target | AR step ms ceiling / expected | TiDAR step ms ceiling / expected | TiDAR / AR "
                  "ceiling / expected | projected speedup ceiling / expected | paper (measured) |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['shape']} | {r['target']} | {1e3 * r['ar_step_s_ceiling']:.2f} / "
                         f"{1e3 * r['ar_step_s_expected']:.2f} | {1e3 * r['tidar_step_s_ceiling']:.2f} / "
                         f"{1e3 * r['tidar_step_s_expected']:.2f} | {r['tidar_over_ar_ceiling']:.2f} / "
                         f"{r['tidar_over_ar_expected']:.2f} | {r['projected_speedup_ceiling']:.2f}x / "
                         f"{r['projected_speedup_expected']:.2f}x | {r['paper_speedup']}x |")
        lines += ["", "The projected speedup assumes the paper's tokens per forward at B = 16 (7.45 at 1.5B, 8.25 at "
                  "8B).", ""]
        for r in result["decode"]:
            lines.append(f"- {r['target']}: {r['assumptions']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b"], choices=sorted(TRAIN_CONFIGS))
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--train-target", default="h100x8")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    cli.add_shared(p, "out")
    args = p.parse_args(argv)

    from tidar_jax.config import ConfigError
    from tidar_jax.targets import parse_target, prepare_environment

    try:
        parsed = [parse_target(t) for t in args.targets + [args.train_target]]
    except ConfigError as e:
        cli.fail(str(e))
    for t in parsed:
        prepare_environment(t)  # before jax initialises

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"command": "python -m benchmarks.estimates " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "estimates_not_measurements": True}
    try:
        if not args.no_train:
            result["train"] = train_rows(args.shapes, args.train_target, log)
        if not args.no_decode:
            result["decode"] = decode_rows(args.shapes, args.targets, args.block_size, args.context, log)
    except ConfigError as e:
        cli.fail(str(e))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "estimates.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
