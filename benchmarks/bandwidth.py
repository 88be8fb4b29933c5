"""AR decode step time vs the memory-bandwidth bound.

    python -m benchmarks.bandwidth --checkpoint RUN_DIR [--quick] [--out benchmarks/results]

Measured in one interleaved run (jitted, batch 1):
  * copy bandwidth: ``y = x + 1`` over a large float32 array (bytes read + bytes written per second), and read
    bandwidth: ``sum(x)`` (bytes read per second);
  * the AR decode step: one forward of 1 token over a KV cache filled to L (LM head on that token), for each L;
  * the whole AR decode loop (``tidar_jax.decode`` in mode "ar"): wall time per generated token.
Bound = bytes one step must read / bandwidth, where bytes = parameters actually read (all of them, except that an
untied input embedding contributes one row) + the K and V cache slots the step attends over. The bandwidth array
should be well above the last-level cache (recorded), and the bound only applies to models whose weights do not fit
in that cache (the result says when they do).
Writes ``bandwidth.json``.
"""

from __future__ import annotations

import os
from functools import partial

from benchmarks import common as bc
from benchmarks import cli

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.model import layer_major

DEFAULTS = {"contexts": "256,1024,4096", "copy_mib": 512, "rounds": 15, "preset": "m38", "new_tokens": 64}
QUICK = {"contexts": "64,512", "copy_mib": 128, "rounds": 5, "preset": "small", "new_tokens": 24}
TINY = {"contexts": "16", "copy_mib": 4, "rounds": 2, "preset": "tiny", "new_tokens": 6}  # smoke tests only


def step_bytes(bundle, cache_slots: int) -> dict[str, int]:
    """Bytes one AR step reads: weights (an untied embedding table only contributes the looked-up row) + KV."""
    cfg = bundle.config
    pure = nnx.to_pure_dict(bundle.params)
    total = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pure)))
    embed = pure["embed"]
    embed_bytes = embed.size * embed.dtype.itemsize
    weight_bytes = total if cfg.tie_embeddings else total - embed_bytes + embed.shape[1] * embed.dtype.itemsize
    kv_bytes = 2 * cfg.num_layers * cache_slots * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return {"weight_bytes": int(weight_bytes), "kv_bytes": int(kv_bytes), "total_bytes": int(weight_bytes + kv_bytes)}


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "checkpoint", "preset", "tiny", "quick")
    p.add_argument("--contexts", help="comma-separated context lengths L (default 256,1024,4096)")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth array in MiB (default 512)")
    cli.add_shared(p, "rounds", "new_tokens", "seed", "out",
                   new_tokens=dict(help="tokens per row for the AR decode-loop timing"))
    args = p.parse_args(argv)
    cli.fill_size_defaults(args, DEFAULTS, quick=QUICK, tiny=TINY)
    args.contexts = cli.parse_int_list(str(args.contexts), "--contexts")
    cli.require_positive(args, ("copy_mib", "rounds", "new_tokens"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    bundle, trained = bc.load_model(args.checkpoint, args.preset, args.seed)
    cfg = bundle.config

    n = args.copy_mib * 2 ** 20 // 4
    x = jnp.arange(n, dtype=jnp.float32)
    # the copy updates a donated buffer in place: a fresh output buffer per call would also time page faults
    copy, read = jax.jit(lambda a: a + 1.0, donate_argnums=0), jax.jit(jnp.sum)
    buf = [jnp.zeros(n, jnp.float32)]

    def copy_step():
        buf[0] = copy(buf[0])
        return buf[0]

    cands = {"copy": copy_step, "read": partial(read, x)}

    fwd = jax.jit(partial(bc.forward, bundle.graphdef))
    decode_params = layer_major.to_layer_major(bundle.params)  # the layout the decoder runs
    rng = np.random.default_rng(args.seed)
    for context in args.contexts:
        inputs = [jnp.asarray(a) for a in bc.plain_inputs(cfg, 1, context, 1, rng)]
        cache = bc.random_cache(cfg, 1, context, args.seed)
        cands[f"ar_step/L={context}"] = partial(fwd, decode_params, cache, *inputs)

    from tidar_jax.decode import Decoder
    dec = Decoder.from_bundle(bundle)
    prompt_len = args.contexts[0]
    prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, prompt_len)]
    loop_kw = dict(mode="ar", max_new_tokens=args.new_tokens, eos_token_id=None)
    cands["ar_loop"] = partial(dec.generate, [prompt], **loop_kw)

    times = bc.interleaved(cands, rounds=args.rounds, warmup=2,
                           sync=lambda r: r if hasattr(r, "stats") else jax.block_until_ready(r))
    s = {k: bc.stats(v) for k, v in times.items()}
    nbytes = n * 4
    copy_bw = 2 * nbytes / s["copy"]["p25"]  # read + write
    read_bw = nbytes / s["read"]["p25"]

    steps = []
    for context in args.contexts:
        st = s[f"ar_step/L={context}"]
        b = step_bytes(bundle, context)
        steps.append({"context": context, "step_ms_p25": st["p25"] * 1e3, "step_ms_min": st["min"] * 1e3,
                      "step_ms_median": st["median"] * 1e3, **b,
                      "bound_ms_copy_bw": b["total_bytes"] / copy_bw * 1e3,
                      "bound_ms_read_bw": b["total_bytes"] / read_bw * 1e3,
                      "step_over_bound_copy": st["p25"] / (b["total_bytes"] / copy_bw),
                      "achieved_gb_s": b["total_bytes"] / st["p25"] / 1e9})

    # the decode loop: one prefill + (new_tokens - 1) steps; attention spans the whole cache buffer every step
    res = dec.generate([prompt], **loop_kw)
    from tidar_jax.decode.api import prompt_bucket
    from tidar_jax.decode.engine import required_cache_size
    opts = dec.options(**{k: v for k, v in loop_kw.items() if k != "eos_token_id"})
    cache_slots = required_cache_size(prompt_bucket(prompt_len, dec.max_cache_len), opts)
    lb = step_bytes(bundle, cache_slots)
    per_token = s["ar_loop"]["p25"] / res.stats["new_tokens"][0]
    loop = {"prompt_len": prompt_len, "new_tokens": res.stats["new_tokens"][0], "nfe": res.stats["nfe"],
            "cache_slots": cache_slots, "ms_per_token_p25": per_token * 1e3, **lb,
            "bound_ms_copy_bw": lb["total_bytes"] / copy_bw * 1e3,
            "per_token_over_bound_copy": per_token / (lb["total_bytes"] / copy_bw),
            "note": "includes the prefill forward, amortised over the generated tokens"}

    llc = bc.last_level_cache_bytes()
    fits = bool(llc) and steps[0]["weight_bytes"] <= llc
    note = (f"the weights ({steps[0]['weight_bytes'] / 2 ** 20:.1f} MiB) fit in the {llc / 2 ** 20:.1f} MiB "
            "last-level cache, so a step need not stream them from DRAM and can beat this DRAM bound"
            if fits else None)
    result = {"benchmark": "bandwidth", "weights_fit_in_last_level_cache": fits, "note": note,
              "machine": bc.machine_info(), "model": bc.model_description(bundle, trained),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "bandwidth": {"array_mib": args.copy_mib, "array_exceeds_llc": (not llc) or nbytes > 2 * llc,
                            "copy_gb_s": copy_bw / 1e9, "read_gb_s": read_bw / 1e9,
                            "copy_ms_p25": s["copy"]["p25"] * 1e3, "read_ms_p25": s["read"]["p25"] * 1e3},
              "ar_step": steps, "ar_loop": loop}
    bc.write_json(os.path.join(args.out, "bandwidth.json"), result)
    print(report(result), flush=True)
    return result


def report(result) -> str:
    bw = result["bandwidth"]
    lines = [f"copy bandwidth {bw['copy_gb_s']:.1f} GB/s (read+write), read bandwidth {bw['read_gb_s']:.1f} GB/s "
             f"({bw['array_mib']} MiB array)"]
    for r in result["ar_step"]:
        lines.append(f"AR step L={r['context']:<5}: {r['step_ms_p25']:7.3f} ms; reads {r['total_bytes'] / 1e6:7.1f} MB "
                     f"(weights {r['weight_bytes'] / 1e6:.1f} + KV {r['kv_bytes'] / 1e6:.1f}) -> bound "
                     f"{r['bound_ms_copy_bw']:.3f} ms at copy bw; step/bound = {r['step_over_bound_copy']:.2f}x "
                     f"({r['achieved_gb_s']:.1f} GB/s achieved)")
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    lp = result["ar_loop"]
    lines.append(f"AR decode loop: {lp['ms_per_token_p25']:.3f} ms/token over a {lp['cache_slots']}-slot cache; bound "
                 f"{lp['bound_ms_copy_bw']:.3f} ms; ratio {lp['per_token_over_bound_copy']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
