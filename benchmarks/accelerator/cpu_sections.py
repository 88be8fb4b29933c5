"""The CPU sections: the scripts whose CPU figures docs/results.md cites, run in this process with the suite's
``--out``, ``--checkpoint`` and size (``--smoke``: tiniest, ``--quick``, else full). Each script writes its own
``<name>.json`` and ``.md`` into ``--out``; the section records the file and the command that reproduces it alone.
Model under test: ``--checkpoint``, else ``runs/tiny`` when that run holds a checkpoint, else a random model (the
scripts then print a loud warning: acceptance and speedups mean nothing)."""

from __future__ import annotations

import importlib
import json
import os
import shlex

from benchmarks import ROOT

DEFAULT_RUN = os.path.join(ROOT, "runs", "tiny")
TINY_MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1",
              "model.mlp_size=64", "data.seq_len=16", "data.global_batch=2"]


def checkpoint(args) -> str | None:
    if args.checkpoint:
        return args.checkpoint
    ckpts = os.path.join(DEFAULT_RUN, "checkpoints")
    trained = os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))
    return DEFAULT_RUN if trained else None


def script_argv(script: str, args) -> tuple[list[str], str]:
    """The script's own command line for the suite's options, and the JSON file it writes."""
    ckpt = checkpoint(args)
    size = "tiny" if args.smoke else "quick" if args.quick else "full"
    if script == "train_step":  # its own model (configs/tiny.yaml), sizes spelled out
        rounds = {"tiny": ["--rounds", "1", *TINY_MODEL], "quick": ["--rounds", "5"], "full": []}[size]
        return ["--out", args.out, *rounds], "train_step.json"
    if script == "decode_speed":  # the toy-or-checkpoint decode; sizes spelled out
        sized = {"tiny": ["--block-sizes", "2", "--batch-sizes", "1", "--rounds", "1", "--max-new-tokens", "6",
                          "--prompt-len", "8", "--vocab", "256", "--hidden", "32", "--layers", "1"],
                 "quick": ["--block-sizes", "4,8", "--batch-sizes", "1,4", "--rounds", "3", "--max-new-tokens", "32"],
                 "full": []}[size]
        return ["--out-dir", args.out, *(["--checkpoint", ckpt] if ckpt else []), *sized], "decode_speed.json"
    sized = {"tiny": ["--tiny"], "quick": ["--quick"], "full": []}[size]
    return ["--out", args.out, *(["--checkpoint", ckpt] if ckpt else []), *sized], f"{script}.json"


def section_cpu(script: str):
    def run(ctx, deadline) -> dict:
        argv, name = script_argv(script, ctx.args)
        command = shlex.join(["python", "-m", f"benchmarks.{script}", *argv])
        ctx.log(command)
        try:
            importlib.import_module(f"benchmarks.{script}").main(argv)
        except SystemExit as e:  # a script's one-line CLI error
            if e.code not in (None, 0):
                raise RuntimeError(f"{command}: {e.code}") from None
        with open(os.path.join(ctx.args.out, name)) as f:
            result = json.load(f)
        model = result.get("model")
        return {"script_command": command, "result_file": name,
                "model": model.get("source", "its own") if isinstance(model, dict) else model,
                "checkpoint": checkpoint(ctx.args)}
    return run
