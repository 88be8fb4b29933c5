#!/usr/bin/env python
"""Compile time of the train step against depth: the scanned stack (``lax.scan`` over stacked layers) should not
grow with the number of layers; the same step with the scan unrolled is shown beside it for contrast.

    python benchmarks/compile_depth.py [--config configs/tiny.yaml] [--layers 4 28] [--repeats 2]

Candidates are compiled interleaved (round robin) on abstract inputs over 8 fake CPU devices; each compile is a
fresh trace + lowering + XLA compile. Writes benchmarks/results/compile_depth.json.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

import jax  # noqa: E402

from benchmarks import cli  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 28])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-unrolled", action="store_true", help="skip the unrolled contrast")
    cli.add_shared(p, "out", out=dict(default="benchmarks/results/compile_depth.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from tidar_jax.scan_options import unrolled_scans
    from tidar_jax.train.config import load_config
    from tidar_jax.analysis.train_plan import compile_train_step

    import contextlib
    candidates = [(n, mode) for mode in (["scan"] + ([] if args.no_unrolled else ["unrolled"]))
                  for n in args.layers]
    times: dict[str, list[float]] = {f"{mode}/{n}": [] for n, mode in candidates}
    for _ in range(args.repeats):
        for n, mode in candidates:  # interleaved
            cfg = load_config(args.config, list(args.overrides) + [f"model.num_layers={n}"]
                              + ([] if "model.mask_token_id" in " ".join(args.overrides) else
                                 ["model.mask_token_id=1"]))
            jax.clear_caches()
            with (unrolled_scans() if mode == "unrolled" else contextlib.nullcontext()):
                _, seconds, _ = compile_train_step(cfg, 8)
            times[f"{mode}/{n}"].append(seconds)
            print(f"{mode:9s} {n:3d} layers: {seconds:7.2f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    lo, hi = min(args.layers), max(args.layers)
    result = {"command": "python " + " ".join(["benchmarks/compile_depth.py"] + (argv or sys.argv[1:])),
              "config": args.config, "overrides": args.overrides, "seconds": times, "best_seconds": best,
              "scan_ratio": best[f"scan/{hi}"] / best[f"scan/{lo}"],
              "unrolled_ratio": None if args.no_unrolled else best[f"unrolled/{hi}"] / best[f"unrolled/{lo}"],
              "load_average": os.getloadavg()}
    print(f"compile time {hi} / {lo} layers: scanned {result['scan_ratio']:.2f}x"
          + ("" if args.no_unrolled else f", unrolled {result['unrolled_ratio']:.2f}x"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
