#!/usr/bin/env python
"""Does the AR step's time depend on the allocated cache size? The decode engine's AR step at a fixed live
length, with the cache allocated at live + 128 slots and at 8x live, for the paged (live-length) and the dense
(concatenating) cache attention, interleaved; ratios from one run.

    python benchmarks/cache_traffic.py [--preset m38] [--live 256] [--rounds 10] [--out benchmarks/results]

Writes ``cache_traffic.json``. Goal (issue 12): paged, 8x live within 10% of live + 128.
"""

from __future__ import annotations

import os
from functools import partial

if not __package__:  # run as a file (python benchmarks/<name>.py): see benchmarks/_repo_on_path.py
    import _repo_on_path  # noqa: F401

from benchmarks import bench_common as bc  # noqa: E402
from benchmarks import cli  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tidar_jax.decode import engine  # noqa: E402
from tidar_jax.decode.options import DecodeOptions  # noqa: E402
from tidar_jax.model import KVCache, layer_major  # noqa: E402


def ar_state(cfg, live: int, allocated: int, opts):
    shape = (cfg.num_layers, 1, allocated, cfg.num_kv_heads, cfg.head_dim)
    kk, kv = jax.random.split(jax.random.key(0))
    dt = jnp.dtype(cfg.dtype)
    cache = KVCache(jax.random.normal(kk, shape, dt), jax.random.normal(kv, shape, dt), jnp.full((1,), live, jnp.int32))
    stops = engine.Stops(jnp.full((8,), -1, jnp.int32), jnp.full((8, 16), -1, jnp.int32), jnp.zeros((8,), jnp.int32))
    return engine._initial_state(cache, jnp.zeros((1, 1), jnp.int32), jax.random.key(0), stops, opts)


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_shared(p, "preset", preset=dict(default="m38"))
    p.add_argument("--live", type=int, default=256)
    cli.add_shared(p, "rounds", rounds=dict(default=10))
    p.add_argument("--page", type=int, default=128)
    cli.add_shared(p, "out")
    args = p.parse_args(argv)
    cli.require_positive(args, ("live", "rounds", "page"))
    bundle = bc.random_bundle(args.preset)
    cfg = bundle.config
    params = layer_major.to_layer_major(bundle.params)  # the layout the decoder runs
    cands = {}

    for attention in ("paged", "dense"):
        opts = DecodeOptions(mode="ar", block_size=1, max_new_tokens=1024, cache_attention=attention,
                             cache_page=args.page).validate()
        fn = jax.jit(partial(engine.step, bundle.graphdef, opts), donate_argnums=(1,))
        for label, allocated in (("live+128", args.live + 128), ("8x live", 8 * args.live)):
            cands[f"{attention}/{label}"] = bc.DonatedStepper(fn, params, ar_state(cfg, args.live, allocated, opts))
    times = bc.interleaved(cands, rounds=args.rounds, warmup=2)
    ms = {k: bc.stats(v)["min"] * 1e3 for k, v in times.items()}
    ratios = {a: ms[f"{a}/8x live"] / ms[f"{a}/live+128"] for a in ("paged", "dense")}
    result = {"benchmark": "cache_traffic", "machine": bc.machine_info(),
              "model": f"random preset {args.preset} ({cfg.num_params / 1e6:.1f}M params)", "live": args.live,
              "page": args.page, "min_ms": ms, "ratio_8x_over_live_plus_128": ratios,
              "paged_over_dense_at_live_plus_128": ms["paged/live+128"] / ms["dense/live+128"]}
    os.makedirs(args.out, exist_ok=True)
    bc.write_json(os.path.join(args.out, "cache_traffic.json"), result)
    for k, v in ms.items():
        print(f"{k:20s} {v:8.2f} ms")
    print(f"8x live / live+128: paged {ratios['paged']:.3f}, dense {ratios['dense']:.3f}; "
          f"load {result['machine'].get('load_average_1_5_15')}")
    return result


if __name__ == "__main__":
    main()
