"""Kernels per decoder layer of the compiled decode step for a deviceless target (issue 22).

The step of a model with L layers launches ``a + L * b`` kernels; compiling the same shape with two and three
layers gives ``b`` (the kernels one layer adds) and its kinds exactly, without the fixed head/bookkeeping part.
Also printed, for a GPU target, how XLA:GPU groups the 3-layer step's thunks into command buffers (CUDA graphs),
read from the compile's thunk dump (``tidar_jax.analysis.thunks``).

    python benchmarks/step_kernels.py --target h100 --preset qwen2.5-1.5b --mode ar --cache-attention fused
"""

from __future__ import annotations

import argparse
import json
import sys

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401


def kind_counts(kernels) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kernels:
        out[k.kind] = out.get(k.kind, 0) + 1
    return out


def per_layer(cfg, devices, mode: str, cache_attention: str, batch: int, block_size: int, context: int) -> dict:
    """Kernels one layer adds to the ``mode`` step (2- vs 3-layer compiles) and their kinds."""
    import tempfile

    from tidar_jax.analysis.thunks import read_dump
    from tidar_jax.analysis.decode_plan import compile_decode
    from tidar_jax.targets import platform_of_devices

    counts = {}
    graphs = None
    with tempfile.TemporaryDirectory() as dump:
        gpu = platform_of_devices(list(devices)) == "gpu"
        for layers in (2, 3):
            progs = compile_decode(cfg.replace(num_layers=layers), devices, batch=batch, block_size=block_size,
                                   context=context, max_new_tokens=256, modes=(mode,),
                                   cache_attention=cache_attention, with_prefill=False,
                                   step_compiler_options={"xla_dump_to": dump} if gpu and layers == 3 else None)
            p = progs[f"{mode} step"].program
            counts[layers] = (kind_counts(p.kernels()), len(p.kernels()),
                              sum(len(lp.body_kernels) for lp in p.loops()) // layers)
        if gpu:
            graphs = read_dump(dump, "step").summary()
    kinds = {k: counts[3][0].get(k, 0) - counts[2][0].get(k, 0) for k in set(counts[3][0]) | set(counts[2][0])}
    return {"mode": mode, "cache_attention": cache_attention, "kernels_per_layer": counts[3][1] - counts[2][1],
            "loop_body_kernels_per_layer": counts[3][2], "kinds_per_layer": {k: v for k, v in kinds.items() if v},
            "command_buffers_3_layers": graphs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="h100")
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--mode", default="ar", choices=("ar", "tidar"))
    p.add_argument("--cache-attention", default="auto", choices=("auto", "paged", "fused", "tpu", "dense"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args(argv)
    from tidar_jax.targets import parse_target, target_devices

    devices = target_devices(parse_target(args.target))
    from tidar_jax.analysis.decode_plan import model_config_for_plan

    cfg = model_config_for_plan(args.preset, None, "bfloat16")
    out = per_layer(cfg, devices, args.mode, args.cache_attention, args.batch, args.block_size, args.context)
    out.update(target=args.target, preset=args.preset, batch=args.batch, context=args.context,
               block_size=args.block_size if args.mode == "tidar" else 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
