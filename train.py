#!/usr/bin/env python
"""TiDAR training: ``python train.py --config configs/tiny.yaml --run-dir runs/tiny [section.key=value ...]``.

Re-running the same command resumes from the newest checkpoint in the run dir. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a TiDAR model (or an AR baseline) on a sharded mesh.")
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--run-dir", required=True, help="checkpoints, TensorBoard events and the resolved config go here")
    p.add_argument("--steps", type=int, default=None, help="total training steps (overrides train.steps)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.seq_len=256")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from tidar_jax.config import ConfigError
    from tidar_jax.train.config import dump_yaml, load_config

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    from tidar_jax.data import DataError
    from tidar_jax.train.loop import Preempted, TrainingDiverged, train
    from tidar_jax.train.summary import format_summary

    try:
        result = train(cfg, args.run_dir)
    except (ConfigError, DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}") from None
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signum
    import jax

    if jax.process_index() == 0:
        print(format_summary(result, cfg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
