"""Section 4: training throughput per attention kernel.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.config import ConfigError, ModelConfig

from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)

# ------------------------------------------------------------------------------------------------------------
# 4. Training throughput per attention kernel
# ------------------------------------------------------------------------------------------------------------

def attention_kernels() -> tuple[list[str], list[dict], str]:
    """The kernels this backend runs (``model.attention``), the ones it cannot run and why, and how that was
    found."""
    from tidar_jax import attention

    ok, rejected = [], []
    for k in ATTENTION_KERNELS:
        try:
            attention.resolve(k)
            ok.append(k)
        except ConfigError as e:
            rejected.append({"kernel": k, "reason": str(e).splitlines()[0]})
    return ok, rejected, "tidar_jax.attention.resolve()"


def measure_matmul_flops(deadline: Deadline, n: int) -> dict:
    """Achieved bf16 matmul FLOP/s on an n x n x n product (the ceiling this device reaches here)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    times = timed_rounds({"mm": partial(mm, a, a)}, 5, deadline)["mm"]
    return {"n": n, "seconds_min": min(times), "flops_per_s": 2 * n ** 3 / min(times)}


def choose_micro_batch(cfg: ModelConfig, seq: int, batch: int, kernel: str, limit: int | None) -> int:
    """Rows per micro-batch: the largest power-of-two divisor of the batch whose rough activation estimate
    (f32 logits + their gradient, dense f32 attention scores for the reference kernel, bf16 layer activations)
    stays under 40 % of the device memory (the other kernels' train states share it). No limit (CPU): the whole
    batch."""
    if not limit:
        return batch
    tokens = 2 * seq
    per_row = tokens * cfg.vocab_size * 4 * 3 + tokens * cfg.hidden_size * 2 * 24 * cfg.num_layers
    if kernel == "reference":
        per_row += cfg.num_heads * tokens * tokens * (4 + 4 + 2)
    m = batch
    while m > 1 and (m * per_row > 0.4 * limit or batch % m):
        m //= 2
    return max(m, 1)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def section_train_throughput(ctx, deadline: Deadline) -> dict:
    """All (kernel, objective, depth) programs are lowered, compiled together in threads and timed interleaved,
    so the kernels are compared within one run; a kernel that fails to lower, compile or run is recorded as
    skipped with the error and the others go on."""
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import OptimSection
    from tidar_jax.train.step import init_train_state, make_step_fns

    sizes = ctx.sizes
    ctx.random_models.clear()  # the random decode models are done with: free their memory first
    gc.collect()
    kinds, rejected, how = attention_kernels()
    has_field = "attention" in {f.name for f in dataclasses.fields(ModelConfig)}
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind)
    mm = measure_matmul_flops(deadline, 256 if ctx.args.smoke else 8192)
    mem = memory_stats()
    limit = mem.get("bytes_limit") if mem else None
    full = qwen_config(sizes.tp_model, sizes)
    S, N = sizes.tp_seq, sizes.tp_batch
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tokens = np.random.default_rng(ctx.args.seed).integers(0, full.vocab_size - 1, (N, S)).astype(np.int32)
    kernels: dict[str, dict] = {k["kernel"]: {"status": "skipped", "reason": k["reason"]} for k in rejected}
    for kernel in kinds[sizes.tp_max_kernels:]:
        kernels[kernel] = {"status": "skipped", "reason": f"this size measures the first {sizes.tp_max_kernels} "
                                                          "kernel(s) only"}
    kinds = kinds[:sizes.tp_max_kernels]
    lowered, meta = {}, {}
    for kernel in kinds:
        micro = choose_micro_batch(full, S, N, kernel, limit)
        kernels[kernel] = {"status": "ok", "reason": None, "grad_accum": N // micro, "micro_batch": micro,
                           "objectives": {}}
        try:
            for objective in ("tidar", "ar"):
                for depth in sizes.tp_layers:
                    cfg = full.replace(num_layers=depth, param_dtype="float32",
                                       **({"attention": kernel} if has_field else {}))
                    graphdef, _ = abstract_model(cfg, remat=sizes.tp_remat)
                    _, params = random_params(cfg, ctx.args.seed)  # no init program to compile
                    optim = OptimSection(name="adam", lr=1e-5, min_lr=1e-5, schedule="constant", warmup_frac=0.0,
                                         grad_accum=N // micro)
                    fns = make_step_fns(graphdef, cfg, params, mesh, optim, 1, objective)
                    state = init_train_state(fns.tx, params, fns.state_shardings)
                    batch = jax.device_put(tokens, fns.batch_sharding)
                    key = (kernel, objective, depth)
                    lowered[key] = fns.train_step.lower(state, batch)
                    meta[key] = {"state": [state], "batch": batch, "cfg": cfg}
        except Exception as e:  # noqa: BLE001 -- e.g. a kernel this backend has no lowering for
            traceback.print_exc()
            kernels[kernel] = {"status": "skipped", "reason": f"lowering failed: {_first_line(e)}"}
            for key in [k for k in lowered if k[0] == kernel]:
                del lowered[key], meta[key]
    if deadline.expired():
        raise SectionSkipped(f"budget: spent {deadline.seconds:.0f} s before compiling the train steps")
    tc = time.perf_counter()
    compiled = {}
    with ThreadPoolExecutor(max_workers=compile_workers()) as pool:
        futures = {key: pool.submit(low.compile) for key, low in lowered.items()}
        for key, future in futures.items():
            try:
                compiled[key] = future.result()
            except Exception as e:  # noqa: BLE001
                if kernels[key[0]]["status"] == "ok":
                    kernels[key[0]] = {"status": "skipped", "reason": f"compile failed: {_first_line(e)}"}
    compile_s = time.perf_counter() - tc
    del lowered
    compiled = {k: v for k, v in compiled.items() if kernels[k[0]]["status"] == "ok"}
    for kernel in kinds:
        if kernels[kernel]["status"] == "ok":
            kernels[kernel]["compile_s"] = compile_s  # all kernels' programs compiled together

    def call(key):
        m = meta[key]
        m["state"][0], metrics = compiled[key](m["state"][0], m["batch"], None)
        return metrics

    times: dict = {}
    try:
        times = timed_rounds({k: partial(call, k) for k in compiled}, sizes.tp_rounds, deadline)
    except Exception:  # noqa: BLE001 -- e.g. out of memory at run time: time the kernels one by one
        traceback.print_exc()
        for key in list(compiled):
            if kernels[key[0]]["status"] != "ok":
                continue
            try:
                times.update(timed_rounds({key: partial(call, key)}, sizes.tp_rounds, deadline))
            except Exception as e2:  # noqa: BLE001
                kernels[key[0]] = {"status": "skipped", "reason": f"running failed: {_first_line(e2)}"}
    peak_mem = memory_stats()
    for kernel in kinds:
        entry = kernels[kernel]
        if entry["status"] != "ok":
            continue
        for objective in ("tidar", "ar"):
            by_depth, rows = {}, []
            for depth in sizes.tp_layers:
                key = (kernel, objective, depth)
                t = min(times[key])
                by_depth[depth] = t
                flops = model_flops(meta[key]["cfg"], N, S, objective)
                rows.append({"layers": depth, "step_s": t, "tokens_per_s": N * S / t, "model_flops": flops,
                             "mfu": mfu(flops, t, peak), "mfu_vs_measured_matmul": mfu(flops, t, mm["flops_per_s"]),
                             "compiled_memory": compiled_memory(compiled[key]), "rounds": len(times[key]),
                             "estimate": estimate_of(compiled[key])})
            ext = extrapolate_depth(by_depth, full.num_layers)
            full_s = ext["full_depth_s"]
            ok = bool(full_s and full_s > 0)
            full_flops = model_flops(full, N, S, objective)
            entry["objectives"][objective] = {
                "by_depth": rows, **ext, "full_depth": full.num_layers,
                "full_tokens_per_s": N * S / full_s if ok else None, "full_model_flops": full_flops,
                "full_mfu": mfu(full_flops, full_s, peak) if ok else None}
        entry["peak_memory"] = peak_mem
        t_tidar, t_ar = (entry["objectives"][o]["full_depth_s"] for o in ("tidar", "ar"))
        entry["tidar_over_ar_step"] = {str(d): min(times[(kernel, "tidar", d)]) / min(times[(kernel, "ar", d)])
                                       for d in sizes.tp_layers}
        entry["tidar_over_ar_step_full"] = t_tidar / t_ar if t_tidar and t_ar and t_ar > 0 else None
    del compiled, meta
    gc.collect()
    if not any(k.get("status") == "ok" for k in kernels.values()):
        raise SectionSkipped("no attention kernel could be measured: " + "; ".join(
            f"{n}: {k['reason']}" for n, k in kernels.items()))
    return {"model": sizes.tp_model, "model_config": full.to_dict(), "seq_len": S, "global_batch": N,
            "remat": sizes.tp_remat, "param_dtype": "float32", "compute_dtype": "bfloat16", "layers_timed": list(sizes.tp_layers),
            "kernels": kernels, "kernel_detection": how, "device_kind": device_kind,
            "peak_flops_per_s": peak, "peak_flops_source": PEAK_SOURCE, "measured_matmul": mm,
            "memory_before": mem,
            "memory_note": ("peak_memory is jax's process-wide peak (device.memory_stats(), None on CPU) after all "
                            "kernels' steps, so it also covers earlier sections and the other kernels; "
                            "compiled_memory is XLA's plan for that one program"),
            "flops_note": ("model FLOPs = 3 x forward: 2 per weight per token through the model (2S for TiDAR, "
                           "S for AR, LM head included) + 4 x heads x head_dim per visible (query, key) pair per "
                           "layer; full-depth figures are extrapolated linearly from the timed depths")}
