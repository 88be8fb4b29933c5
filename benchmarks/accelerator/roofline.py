"""Section 3: AR decode against the memory roofline.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)
from benchmarks.accelerator.free_slots import get_random_model

# ------------------------------------------------------------------------------------------------------------
# 3. AR decode vs the memory roofline
# ------------------------------------------------------------------------------------------------------------

def measure_copy_bandwidth(nbytes: int, rounds: int, deadline: Deadline) -> dict:
    """Device copy bandwidth (bytes read + written per second) of ``y = x + 1`` on a donated float32 buffer."""
    n = nbytes // 4
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    buf = [jnp.zeros(n, jnp.float32)]

    def step():
        buf[0] = copy(buf[0])
        return buf[0]

    times = timed_rounds({"copy": step}, max(rounds, 3), deadline)["copy"]
    best = min(times)
    return {"array_bytes": n * 4, "copy_ms_min": best * 1e3, "copy_gb_s": 2 * n * 4 / best / 1e9,
            "rounds": len(times)}


def section_roofline(ctx, deadline: Deadline) -> dict:
    from tidar_jax.decode import Decoder

    sizes = ctx.sizes
    bw = measure_copy_bandwidth(sizes.copy_bytes, sizes.slot_rounds, deadline)
    bytes_per_s = bw["copy_gb_s"] * 1e9
    slots = ctx.results["sections"]["free_slots"].get("models") or {}
    rows, loops, skipped = [], [], []
    names = sorted(sizes.shapes, key=lambda n: (n not in PAPER, list(sizes.shapes).index(n)))
    rng = np.random.default_rng(ctx.args.seed)
    for name in names:
        cfg = qwen_config(name, sizes)
        w = weight_bytes_per_token(cfg, 2)
        ar_kind = "ar_step"  # the engine's AR step (see section_free_slots)
        measured = {r["context"]: r for r in (slots.get(name) or {}).get("latency", [])
                    if r["kind"] == ar_kind and r["batch"] == 1 and r["query_tokens"] == 1}
        for context in sizes.slot_contexts:
            r = measured.get(context)
            if r is None:  # free_slots skipped this one: time the AR step here
                if deadline.left() < 5:
                    skipped.append({"model": name, "context": context, "what": "ar_step", "reason": "budget"})
                    continue
                mcfg, graphdef, params, _ = get_random_model(ctx, name)
                args = (params, random_cache(mcfg, 1, context, ctx.args.seed),
                        *[jnp.asarray(a) for a in plain_inputs(mcfg, 1, context, 1, rng)])
                fn = jax.jit(partial(forward, graphdef)).lower(*args).compile()
                t = timed_rounds({"s": partial(fn, *args)}, sizes.slot_rounds, deadline)["s"]
                step_ms = min(t) * 1e3
                estimate = estimate_of(fn, -(-context // 128))
            else:
                step_ms, estimate = r["min_ms"], r.get("estimate")
            kv = kv_bytes(cfg, context, 2)
            bound_ms = (w + kv) / bytes_per_s * 1e3
            rows.append({"model": name, "context": context, "weight_bytes": w, "kv_bytes": kv,
                         "bytes_per_step": w + kv, "bound_ms": bound_ms, "ar_step_ms": step_ms,
                         "tokens_per_s": 1e3 / step_ms, "bound_tokens_per_s": 1e3 / bound_ms,
                         "fraction_of_roofline": bound_ms / step_ms, "estimate": estimate})
    # the real decode loop (prefill + steps in one while_loop), batch 1, if the budget allows
    loop_est = 0.0
    for i, name in enumerate(names):
        if i >= sizes.loop_models:
            skipped.append({"model": name, "what": "ar_loop", "reason": "not measured at this size"})
            continue
        if deadline.left() < max(10.0 if not ctx.args.smoke else 0.0, 1.5 * loop_est):
            skipped.append({"model": name, "what": "ar_loop", "reason": f"budget: {deadline.left():.1f} s left"})
            continue
        t0 = time.perf_counter()
        cfg, graphdef, params, _ = get_random_model(ctx, name)
        dec = Decoder(cfg, graphdef, params, eos_token_id=None)
        prompt = [int(t) for t in rng.integers(2, cfg.vocab_size, sizes.loop_prompt_len)]
        kw = dict(mode="ar", max_new_tokens=sizes.loop_new_tokens, eos_token_id=None)
        first = dec.generate([prompt], **kw)
        walls = timed_rounds({"loop": partial(dec.generate, [prompt], **kw)}, 3, deadline, sync=lambda r: r)["loop"]
        best = min(walls)
        new = sum(first.stats["new_tokens"])
        slots_read = sizes.loop_prompt_len + sizes.loop_new_tokens  # visible slots at the end of the run
        w = weight_bytes_per_token(cfg, 2)
        loop_bound = (w + kv_bytes(cfg, slots_read, 2)) / bytes_per_s
        loops.append({"model": name, "prompt_len": sizes.loop_prompt_len, "new_tokens": new,
                      "wall_s_min": best, "ms_per_token": best / new * 1e3, "tokens_per_s": new / best,
                      "bound_ms_per_token": loop_bound * 1e3, "fraction_of_roofline": loop_bound / (best / new),
                      "compile_s": first.stats["compile_s"]})
        loop_est = time.perf_counter() - t0
    return {"bandwidth": bw, "ar_step": rows, "ar_loop": loops, "skipped": skipped,
            "note": ("bound = (weight bytes + K/V bytes of the visible cache) / measured copy bandwidth; weights "
                     "bf16, an untied input embedding counted as one row; ar_step is the batch-1 forward of one "
                     "token over a full cache (free_slots q=1 row); ar_loop includes the prefill, amortised, and "
                     "its bound uses the cache at the end of the run (an upper bound on the bytes per token)")}
