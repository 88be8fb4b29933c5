#!/usr/bin/env python
"""The decode step measured on the device it runs on, beside the cost model's estimate of the same compiled
program: AR and TiDAR at B = 4, 8, 16 for batch 1 and 8 and contexts 1024 and 4096, at the Qwen2.5-1.5B
and Qwen3-8B shapes (random weights: a step's time does not depend on their values).

Each case builds the engine's step (per-layer weights, ``cache_attention="auto"``, the state donated and fed back
as the decode loop does) with a cache whose rows are live up to the context, times it interleaved with the other
cases of the same model, and, where the device is a known chip (``tidar_jax.targets.CHIPS`` by device kind), puts
``tidar_jax.analysis.cost_model.estimate`` of that very compiled step beside the time.

    python -m benchmarks.gpu_decode_step [--presets qwen2.5-1.5b,qwen3-8b] [--rounds 20] [--out benchmarks/results]

Writes ``gpu_decode_step.json``. On CPU it runs (tests use ``--presets tiny``); its numbers mean nothing there.
"""

from __future__ import annotations

import os
from functools import partial

from benchmarks import common as bc
from benchmarks import cli

import jax
import jax.numpy as jnp

from tidar_jax.decode import engine
from tidar_jax.decode.options import DecodeOptions
from tidar_jax.model import KVCache, layer_major



def step_state(cfg, opts: DecodeOptions, batch: int, context: int):
    """A state whose rows are live up to ``context`` with room for the step's writes (random K/V and drafts)."""
    cache_size = context + opts.draft_len + 1
    shape = (cfg.num_layers, batch, cache_size, cfg.num_kv_heads, cfg.head_dim)
    kk, kv, kd = jax.random.split(jax.random.key(0), 3)
    dt = jnp.dtype(opts.cache_dtype or cfg.dtype)
    cache = KVCache(jax.random.normal(kk, shape, dt), jax.random.normal(kv, shape, dt),
                    jnp.full((batch,), context, jnp.int32))
    stops = engine.Stops(jnp.full((8,), -1, jnp.int32), jnp.full((8, 16), -1, jnp.int32), jnp.zeros((8,), jnp.int32))
    pending = jax.random.randint(kd, (batch, opts.draft_len), 0, cfg.vocab_size, jnp.int32)
    return engine._initial_state(cache, pending, jax.random.key(0), stops, opts)


def chip_of_device(device):
    from tidar_jax.targets import CHIPS

    return next((c for c in CHIPS.values() if c.description == device.device_kind), None)


def run_preset(preset: str, block_sizes, batches, contexts, rounds: int, dtype: str) -> list[dict]:
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.decode.api import cast_params

    bundle = bc.random_bundle(preset, dtype=dtype, param_dtype=dtype)
    cfg = bundle.config
    params = layer_major.to_layer_major(cast_params(bundle.params, jnp.dtype(dtype)))
    chip = chip_of_device(jax.devices()[0])
    cases, cands = [], {}
    for mode, block in [("ar", 1)] + [("tidar", b) for b in block_sizes]:
        opts = DecodeOptions(mode=mode, block_size=block, max_new_tokens=1 << 20).validate()
        fn = jax.jit(partial(engine.step, bundle.graphdef, opts), donate_argnums=(1,))
        for batch in batches:
            for context in contexts:
                name = f"{mode} B={block} batch={batch} context={context}"
                state = step_state(cfg, opts, batch, context)
                compiled = fn.lower(params, state).compile()
                # both launch assumptions beside the measurement, so the first GPU run says which one holds
                est, graph = ((estimate(HloProgram.of(compiled), chip, live_cache_slots=context).summary(),
                               estimate(HloProgram.of(compiled), chip, graph=True,
                                        live_cache_slots=context).summary()) if chip is not None else (None, None))
                cands[name] = bc.DonatedStepper(compiled, params, state)
                cases.append({"name": name, "mode": mode, "block_size": block, "batch": batch, "context": context,
                              "estimate_s": est["time_s"] if est else None,
                              "estimate_graph_s": graph["time_s"] if graph else None,
                              "estimate_assumptions": est["assumptions_line"] if est else None})
    times = bc.interleaved(cands, rounds=rounds, warmup=2)
    for case in cases:
        case["measured_s"] = bc.stats(times[case["name"]])["min"]
        case["measured_over_estimate"] = (case["measured_s"] / case["estimate_s"]) if case["estimate_s"] else None
    ar = {(c["batch"], c["context"]): c["measured_s"] for c in cases if c["mode"] == "ar"}
    for case in cases:
        case["over_ar_step"] = case["measured_s"] / ar[(case["batch"], case["context"])]
    return [{"preset": preset, **c} for c in cases]


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--presets", default="qwen2.5-1.5b,qwen3-8b", help="comma-separated model shapes")
    p.add_argument("--block-sizes", default="4,8,16", help="TiDAR block sizes (beside the AR step)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, float32 on CPU")
    cli.add_shared(p, "rounds", rounds=dict(default=20))
    cli.add_shared(p, "out")
    args = p.parse_args(argv)
    cli.require_positive(args, ("rounds",))
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    block_sizes = cli.parse_int_list(args.block_sizes, "block-sizes")
    batches = cli.parse_int_list(args.batches, "batches")
    contexts = cli.parse_int_list(args.contexts, "contexts")
    rows = []
    for preset in args.presets.split(","):
        rows += run_preset(preset, block_sizes, batches, contexts, args.rounds, dtype)
    result = {"benchmark": "gpu_decode_step", "machine": bc.machine_info(), "dtype": dtype, "cases": rows}
    os.makedirs(args.out, exist_ok=True)
    bc.write_json(os.path.join(args.out, "gpu_decode_step.json"), result)
    for r in rows:
        est = f"{r['estimate_s'] * 1e3:8.3f} ms ESTIMATE" if r["estimate_s"] else "  (no estimate for this device)"
        print(f"{r['preset']:14s} {r['name']:36s} {r['measured_s'] * 1e3:8.3f} ms measured, {est}, "
              f"{r['over_ar_step']:.2f}x the AR step")
    return result


if __name__ == "__main__":
    main()
