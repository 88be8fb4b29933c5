"""Section 7: calibrate the efficiency table (``tidar_jax.analysis.efficiency``) from this device.

On a listed chip (``tidar_jax.targets.CHIPS`` by device kind) the TiDAR decode step of the Qwen2.5-1.5B shape
(batch 1, B = 16, context 1024, bf16, random weights) is compiled, timed, and run under ``jax.profiler`` with a
Perfetto trace; each device kernel's mean duration (the trace names a kernel after its HLO instruction, ``.`` as
``_``) and the step time are written as a profile in ``tidar_jax.analysis.calibrate``'s format (``profile.json``),
and ``calibrate`` fits the table against the cost model's ceiling of that very compiled step, writing
``efficiency_calibrated.json`` into ``--out`` (copy it to ``tidar_jax/analysis/`` for the estimates to read it).

``--smoke`` (CPU: no chip to calibrate) runs the same path from the recorded profile-like fixture
(tests/fixtures/profile_h100_tidar_step.json, SYNTHESIZED, labelled as such in every entry it fits)."""

from __future__ import annotations

import glob
import gzip
import json
import os
import time
from functools import partial

from benchmarks import common as bc
from benchmarks.common import Deadline, SectionSkipped

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "profile_h100_tidar_step.json")
PRESET, BLOCK, CONTEXT, TRACED_STEPS = "qwen2.5-1.5b", 16, 1024, 5
DEVICE_PROCESS = ("/device:GPU", "/device:TPU")


def kernel_times(trace: dict) -> dict[str, float]:
    """Mean seconds per launch of each device kernel in a Chrome/Perfetto ``trace``: complete (``X``) events on
    device processes, by name."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and any(d in str(e.get("args", {}).get("name", "")) for d in DEVICE_PROCESS)}
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and e.get("dur", 0) > 0:
            total[e["name"]] = total.get(e["name"], 0.0) + e["dur"] * 1e-6
            count[e["name"]] = count.get(e["name"], 0) + 1
    return {name: total[name] / count[name] for name in total}


def write_profile(path: str, chip: str, graph: bool, source: str, kernels: dict[str, float],
                  step_s: float | None) -> str:
    with open(path, "w") as f:
        json.dump({"chip": chip, "graph": graph, "source": source, "kernels": kernels, "step_s": step_s}, f, indent=1)
    return path


def calibrate_into(out_dir: str, ceiling, profile_path: str) -> dict:
    """Fit from ``profile_path`` against ``ceiling`` (``CeilingKernel``s of the program it measured) and write
    ``efficiency_calibrated.json`` into ``out_dir``; the entries as a dict."""
    from tidar_jax.analysis.calibrate import calibrate

    path = os.path.join(out_dir, "efficiency_calibrated.json")
    entries = calibrate(ceiling, profile_path, path)
    return {"calibrated_path": path, "profile": profile_path,
            "entries": {cls: {"value": e.value, "source": e.source} for cls, e in entries.items()}}


def _from_fixture(out_dir: str) -> dict:
    from tidar_jax.analysis.efficiency import CeilingKernel

    with open(FIXTURE) as f:
        doc = json.load(f)
    profile = write_profile(os.path.join(out_dir, "profile.json"), doc["chip"], doc["graph"], doc["source"],
                            doc["kernels"], doc["step_s"])
    return {"measured": False, **calibrate_into(out_dir, [CeilingKernel(**k) for k in doc["ceiling"]], profile)}


def _measure(ctx, chip, deadline) -> dict:
    import jax

    from benchmarks import gpu_decode_step
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.efficiency import CeilingKernel
    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.decode import engine
    from tidar_jax.decode.api import cast_params
    from tidar_jax.decode.options import DecodeOptions
    from tidar_jax.model import layer_major

    import jax.numpy as jnp

    bundle = bc.random_bundle(PRESET, dtype="bfloat16", param_dtype="bfloat16")
    params = layer_major.to_layer_major(cast_params(bundle.params, jnp.bfloat16))
    opts = DecodeOptions(mode="tidar", block_size=BLOCK, max_new_tokens=1 << 20).validate()
    state = gpu_decode_step.step_state(bundle.config, opts, 1, CONTEXT)
    compiled = jax.jit(partial(engine.step, bundle.graphdef, opts), donate_argnums=(1,)).lower(params, state).compile()
    stepper = bc.DonatedStepper(compiled, params, state)
    step_s = bc.stats(bc.interleaved({"step": stepper}, rounds=10, warmup=2)["step"])["min"]
    if deadline.left() < 20:
        raise SectionSkipped(f"budget: {deadline.left():.0f} s left after timing the step")
    trace_dir = os.path.join(ctx.tmp, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(TRACED_STEPS):
            jax.block_until_ready(stepper())
    found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SectionSkipped("jax.profiler wrote no perfetto_trace.json.gz")
    with gzip.open(found[0], "rt") as f:
        kernels = kernel_times(json.load(f))
    est = estimate(HloProgram.of(compiled), chip, graph=False, live_cache_slots=CONTEXT)
    ceiling = [CeilingKernel.of(k, est.assumptions) for k in est.kernels]
    profile = write_profile(os.path.join(ctx.args.out, "profile.json"), chip.name, False,
                            f"measured on {jax.devices()[0].device_kind}: {PRESET} TiDAR step B={BLOCK}, batch 1, "
                            f"context {CONTEXT}, {time.strftime('%Y-%m-%d', time.gmtime())}", kernels, step_s)
    return {"measured": True, "step_s": step_s, "traced_kernels": len(kernels), "ceiling_kernels": len(ceiling),
            **calibrate_into(ctx.args.out, ceiling, profile)}


def section_calibration(ctx, deadline: Deadline) -> dict:
    if ctx.args.smoke:
        return _from_fixture(ctx.args.out)
    import jax

    from benchmarks.gpu_decode_step import chip_of_device

    chip = chip_of_device(jax.devices()[0])
    if chip is None:
        raise SectionSkipped(f"{jax.devices()[0].device_kind} is not a listed chip: nothing to calibrate")
    return _measure(ctx, chip, deadline)
