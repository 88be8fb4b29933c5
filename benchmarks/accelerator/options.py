"""The suite's command line and its section names: jax-free, so bad input is one line before jax starts."""

from __future__ import annotations

import os

from benchmarks import cli

SECTIONS = ("trained_speedup", "free_slots", "roofline", "train_throughput", "attention_kernels", "decode_step",
            "calibration")
# CPU sections: the scripts whose CPU figures docs/results.md cites, run by name (not by default: they measure a
# checkpoint on the host, not the device)
CPU_SECTIONS = ("cpu_train_step", "cpu_free_slots", "cpu_decode_modes", "cpu_vs_transformers", "cpu_decode_speed")


def parse_args(argv):
    import benchmarks.accelerator as suite

    p = cli.parser(suite.__doc__)
    cli.add_shared(p, "out", out=dict(required=True, default=None,
                                      help="output directory (accelerator.json, accelerator.md, PNGs)"))
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget in seconds for the suite after start-up (default 440: with imports, "
                        "about 8 minutes; --smoke: 3600, so every section runs however busy the machine)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (the CPU test); numbers mean "
                                                       "nothing")
    cli.add_shared(p, "data", data=dict(help="prepared corpus dir (default data/stdlib, prepared from the stdlib if "
                                             "missing)"))
    p.add_argument("--prompt-file", help="extra decode prompts: UTF-8 text, prompts separated by lines '---'")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS + CPU_SECTIONS)}")
    cli.add_shared(p, "seed", "quick", "checkpoint", quick=dict(help="CPU sections at their quick size"),
                   checkpoint=dict(help="CPU sections: run dir / checkpoint / HF dir (default: runs/tiny if trained, "
                                        "else a random model)"))
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.smoke else 440.0  # smoke: every section runs, however busy the machine
    if not args.budget_s > 0:
        cli.fail(f"--budget-s={args.budget_s:g}: must be > 0 seconds")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS + CPU_SECTIONS]
    if bad or not wanted:
        cli.fail(f"--sections={args.sections!r}: must be a comma-separated subset of "
                 f"{', '.join(SECTIONS + CPU_SECTIONS)}")
    args.sections = [s for s in SECTIONS + CPU_SECTIONS if s in wanted]
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        cli.fail(f"--checkpoint={args.checkpoint}: does not exist")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        cli.fail(f"--prompt-file={args.prompt_file}: no such file")
    if args.data and not os.path.isfile(os.path.join(args.data, "manifest.json")):
        cli.fail(f"--data={args.data}: no manifest.json there (prepare it with python -m tidar_jax.data.prepare)")
    return args
