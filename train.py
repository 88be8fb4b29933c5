#!/usr/bin/env python
"""TiDAR training: ``python train.py --config configs/tiny.yaml --run-dir runs/tiny [section.key=value ...]``.

Re-running the same command resumes from the newest checkpoint in the run dir. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

from tidar_jax.cli import OneLineArgumentParser


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description="Train a TiDAR model (or an AR baseline) on a sharded mesh.")
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoints, TensorBoard events and the resolved config go here (required unless --plan)")
    p.add_argument("--steps", type=int, default=None,
                   help="total training steps (overrides train.steps; of the last phase for a preset with phases)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config(s) and exit")
    p.add_argument("--no-phases", action="store_true",
                   help="ignore the preset's phases: train its base sections alone in one run (for configs/tiny.yaml: "
                        "TiDAR from scratch instead of AR first, then TiDAR)")
    p.add_argument("--plan", action="store_true",
                   help="compile the train step on abstract inputs over fake CPU devices; print per-device memory "
                        "and FLOPs, and exit (no weights, no data)")
    p.add_argument("--plan-devices", type=int, default=8, help="fake devices for --plan (default 8)")
    p.add_argument("--target", default=None,
                   help="with --plan: compile for this target instead of fake CPU devices (h100x8, h200x8, a100x8, "
                        "b200x8, v5e-8, v5p-8, v6e-8; docs/training.md) and add the cost model's step-time estimate")
    p.add_argument("--json", action="store_true", help="with --plan: print the figures as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.seq_len=256")
    return p


def _fake_cpu_devices(n: int) -> None:
    """N CPU devices for --plan; must run before jax initialises its backends."""
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _plan(cfg, args) -> int:
    import json

    from tidar_jax.config import ConfigError
    from tidar_jax.sharding import ShardingError
    from tidar_jax.analysis.train_plan import format_plan, json_summary, run_plan, to_builtin

    try:
        result = run_plan(cfg, args.plan_devices, target=getattr(args, "parsed_target", None))
    except (ConfigError, ShardingError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(to_builtin(json_summary(result)), indent=2) if args.json else format_plan(result), flush=True)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    args.parsed_target = None
    if args.target is not None and not args.plan:
        raise SystemExit("error: --target needs --plan (it compiles for a machine that is not here)")
    if args.plan and args.target is not None:
        # parsed and the environment set before jax initialises (tidar_jax.targets imports no jax)
        from tidar_jax.targets import TargetError, parse_target, prepare_environment

        try:
            args.parsed_target = parse_target(args.target)
        except TargetError as e:
            raise SystemExit(f"error: {e}") from None
        prepare_environment(args.parsed_target)
    elif args.plan:
        if args.plan_devices < 1:
            raise SystemExit(f"error: --plan-devices={args.plan_devices}: must be >= 1")
        _fake_cpu_devices(args.plan_devices)
    elif args.run_dir is None and not args.print_config:
        raise SystemExit("error: --run-dir is required (unless --plan or --print-config)")
    from tidar_jax.config import ConfigError
    from tidar_jax.train.config import dump_yaml, load_config
    from tidar_jax.train.phases import Phase, load_phases

    overrides = list(args.overrides)
    try:
        if args.no_phases:
            steps = [f"train.steps={args.steps}"] if args.steps is not None else []
            phases = [Phase(None, args.run_dir, load_config(args.config, overrides + steps))]
        else:
            phases = load_phases(args.config, overrides, args.run_dir, steps=args.steps)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.print_config:  # one YAML document per phase
        print("---\n".join((f"# phase '{p.name}' -> {p.run_dir}\n" if p.name else "") + dump_yaml(p.cfg)
                           for p in phases), end="")
        return 0
    if args.plan:  # the last phase: the TiDAR step whose memory matters
        return _plan(phases[-1].cfg, args)

    from tidar_jax.data import DataError
    from tidar_jax.output_paths import OutputPathError
    import jax

    from tidar_jax.train.loop import Preempted, TrainingDiverged
    from tidar_jax.train.phases import run_phases
    from tidar_jax.train.summary import format_summary

    def report(phase, result):
        if jax.process_index() == 0:
            print(format_summary(result, phase.cfg), flush=True)

    try:
        run_phases(phases, report=report)
    except (ConfigError, DataError, OutputPathError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}") from None
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
