"""Section 2: free token slots on real shapes (forward latency vs query tokens; the exact TiDAR step).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

from benchmarks import common as bc

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import masks

from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)

# ------------------------------------------------------------------------------------------------------------
# 2. Free token slots on real shapes
# ------------------------------------------------------------------------------------------------------------


def decode_params(params):
    """The params in the layout the decoder runs (per-layer buffers: a scan over stacked weights would copy each
    layer's weights per forward)."""
    from tidar_jax.model.layer_major import to_layer_major

    return to_layer_major(params)


def resolved_kernel(setting: str) -> str:
    """The kernel a ``model.attention`` setting runs on this backend ("auto" resolved), for the record."""
    from tidar_jax import attention

    return f"{attention.resolve(setting)} (model.attention={setting})"


def _engine_forward(graphdef, block, groups, params, cache, tokens_NT, positions_NT, length_N, rows_NX):
    """The decode engine's step forward with its attention layout, built inside the program as the engine does."""
    from tidar_jax.model import layer_major

    model = layer_major.merge(graphdef, params)
    layout = masks.decode_attention_layout(length_N, block, cache.k_LNCKD.shape[2], groups=groups)
    hidden_NTE, _ = model.hidden(tokens_NT, positions_NT, layout, cache)
    return model.logits(jnp.take_along_axis(hidden_NTE, rows_NX[:, :, None], axis=1))


def get_random_model(ctx, name: str):
    if name not in ctx.random_models:
        cfg = qwen_config(name, ctx.sizes)
        t0 = time.perf_counter()
        graphdef, params = random_params(cfg, ctx.args.seed)
        params = decode_params(params)  # only forwards and the Decoder use these: the decode layout, once
        jax.block_until_ready(params)
        ctx.random_models[name] = (cfg, graphdef, params, time.perf_counter() - t0)
    return ctx.random_models[name]


def section_free_slots(ctx, deadline: Deadline) -> dict:
    sizes = ctx.sizes
    names = list(sizes.shapes)
    queries = bc.query_grid(sizes.slot_max_query)
    # priority: batch 1 before batch 8, the paper's two models before 0.5B, the shorter context first
    order = sorted(names, key=lambda n: (n not in PAPER, names.index(n)))
    groups = [(name, n, c) for n in sizes.slot_batches for name in order for c in sizes.slot_contexts]
    models: dict[str, dict] = {}
    for name in order:
        cfg = qwen_config(name, sizes)
        models[name] = {"shape": sizes.shapes[name], "num_params": cfg.num_params, "layers_timed": cfg.num_layers,
                        "weight_bytes": cfg.num_params * 2, "init_s": None, "latency": [], "skipped": []}
    group_cost: dict[str, float] = {}
    rng = np.random.default_rng(ctx.args.seed)
    fwd_cache: dict[str, Callable] = {}
    for name, batch, context in groups:
        est = group_cost.get(name, max(group_cost.values(), default=0.0))
        if deadline.left() < est or deadline.expired():
            models[name]["skipped"].append({"batch": batch, "context": context,
                                            "reason": f"budget: {deadline.left():.1f} s left, a group took "
                                                      f"{est:.1f} s"})
            continue
        t0 = time.perf_counter()
        cfg, graphdef, params, init_s = get_random_model(ctx, name)
        models[name]["init_s"] = init_s
        fwd = fwd_cache.setdefault(name, jax.jit(partial(forward, graphdef)))
        cache = random_cache(cfg, batch, context, ctx.args.seed)
        specs = [("plain", q, None, plain_inputs(cfg, batch, context, q, rng)) for q in queries]
        specs += [("tidar_step", b * (b + 1), b, step_inputs(cfg, batch, context, b, rng)) for b in sizes.slot_blocks]
        specs.append(("ar_step", 1, None, plain_inputs(cfg, batch, context, 1, rng)))  # the engine's AR step
        lowered, calls, meta = {}, {}, {}
        length = jnp.full((batch,), context, jnp.int32)
        for kind, q, block, inputs in specs:
            arrays = [jnp.asarray(a) for a in inputs]
            key = f"{kind}/q={q}"
            if kind != "plain":
                program = jax.jit(partial(_engine_forward, graphdef, block or 1, kind == "tidar_step"))
                args = (params, cache, arrays[0], arrays[1], length, arrays[3])
            else:
                program, args = fwd, (params, cache, *arrays)
            lowered[key] = program.lower(*args)
            calls[key] = args
            meta[key] = {"kind": kind, "batch": batch, "context": context, "query_tokens": q,
                         "block_size": block, "head_rows": int(inputs[3].shape[1])}
        tc = time.perf_counter()
        compiled = compile_all(lowered, compile_workers())
        compile_s = time.perf_counter() - tc
        times = timed_rounds({k: partial(compiled[k], *calls[k]) for k in compiled}, sizes.slot_rounds, deadline)
        for key, samples in times.items():
            s = bc.stats(samples)
            models[name]["latency"].append({**meta[key], "min_ms": s["min"] * 1e3, "median_ms": s["median"] * 1e3,
                                            "rounds": s["n"],
                                            "estimate": estimate_of(compiled[key], -(-context // 128))})
        base = {r["context"]: r["min_ms"] for r in models[name]["latency"]
                if r["kind"] == "plain" and r["query_tokens"] == 1 and r["batch"] == batch}
        for r in models[name]["latency"]:
            if r["batch"] == batch and r["context"] == context:
                r["vs_q1"] = r["min_ms"] / base[context]
        models[name].setdefault("compile_s", []).append({"batch": batch, "context": context, "programs": len(lowered),
                                                         "seconds": compile_s})
        del cache, compiled, lowered, calls
        group_cost[name] = time.perf_counter() - t0

    projections = []
    for name, paper in PAPER.items():
        if name not in models:
            continue
        lat = {(r["kind"], r["batch"], r["context"], r["query_tokens"]): r["min_ms"] for r in models[name]["latency"]}
        b = paper["block_size"]
        for batch in sizes.slot_batches:
            for context in sizes.slot_contexts:
                ar = lat.get(("ar_step", batch, context, 1))
                step = lat.get(("tidar_step", batch, context, b * (b + 1)))
                if ar is None or step is None:
                    continue
                projections.append({
                    "model": name, "paper_model": paper["paper_model"], "batch": batch, "context": context,
                    "block_size": b, "paper_tokens_per_nfe": paper["tokens_per_nfe"], "ar_step_ms": ar,
                    "tidar_step_ms": step, "step_cost_ratio": step / ar,
                    "projected_speedup": projected_speedup(paper["tokens_per_nfe"], ar, step),
                    "paper_speedup": paper["speedup"]})
    for name in models:
        if not models[name]["latency"]:
            models[name]["skipped"].insert(0, {"batch": None, "context": None, "reason": "no group fitted"})
    if not any(m["latency"] for m in models.values()):
        raise SectionSkipped("no (model, batch, context) group fitted the budget")
    return {"models": models, "projections": projections, "queries": queries, "blocks": list(sizes.slot_blocks),
            "contexts": list(sizes.slot_contexts), "batches": list(sizes.slot_batches), "statistic": "min",
            "dtype": "bfloat16",
            "attention_kernel": resolved_kernel(qwen_config(order[0], sizes).attention),
            "note": ("random-init weights with the real shapes; plain rows: [KV cache | q tokens] with the LM head "
                     "on all q rows, dense masks (reference kernel); tidar_step rows: the decode engine's step "
                     "forward (q = B(B+1), head on 2B rows) and ar_step rows its AR step, each with the engine's "
                     "attention layout and the model's kernel; projected speedup = paper T/NFE x AR step "
                     "/ TiDAR step at B=16 (the forward only: sampling, cache writes and prefill are not in it)")}
