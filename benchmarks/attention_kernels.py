#!/usr/bin/env python
"""Accelerator-suite section: the attention kernels alone on the TiDAR training layout, forward and forward +
backward, each time beside the cost model's estimate of the same compiled program.

    python -m benchmarks.accelerator --sections attention_kernels --out DIR   # the timing (a suite section)
    python -m benchmarks.attention_kernels --estimate h100x8 --out DIR         # the train step's attention share
    python -m benchmarks.attention_kernels --rank h100 h200 a100 b200  # the cost model's ranking auto reads
    python -m benchmarks.attention_kernels --record-measured accelerator.json  # a lent device's ranking instead

Shapes: qwen2.5-1.5b attention (12 query / 2 kv heads, head_dim 128, bf16), block 16, S = 2048 and 4096 (the
doubled sequence is 2S), batch 16 rows split into micro-batches of ``--rows`` (default 1: one device's share of a
16-row global batch on 8 GPUs is 2). The estimate is ``tidar_jax.analysis.cost_model`` on the compiled program
with the local chip's figures (``None`` where the device is not a listed chip, e.g. on CPU); it charges pallas_gpu
for the tiles it visits (the kernels declare them, ``tidar_jax.analysis.kernel_costs``) and cudnn for every query-key
pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import attention, masks, targets
from tidar_jax.checkpoint import atomic
from tidar_jax.attention import choice, pallas_gpu

GPU_KERNELS = ("pallas_gpu", "cudnn", "blockwise")
SHAPES = ((2048, 16), (4096, 16))  # (S, block)
HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128


def _estimate(compiled, chip) -> float | None:
    if chip is None:
        return None
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram

    return estimate(HloProgram.of(compiled), chip).time_s


def _time(fn, args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))  # warm (compiled already)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def programs(kernel: str, layout):
    """``(forward, forward + backward)`` of ``kernel`` on ``layout``: what is timed and what is estimated."""

    def fwd(q, k, v):
        return attention.attend(q, k, v, layout, kernel)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd, q, k, v)
        return vjp(out)

    return fwd, fwd_bwd


def measure(kernel: str, seq_len: int, block: int, rows: int, heads: int, kv_heads: int, head_dim: int, dtype,
            repeat: int, chip) -> dict:
    """Forward and forward+backward time (best of ``repeat``) and the cost-model estimate of each program."""
    layout = masks.training_layout(seq_len, block)
    t = layout.q_len
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(rows, t, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(rows, t, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(rows, t, kv_heads, head_dim)), dtype)

    fwd, fwd_bwd = programs(kernel, layout)
    row = {"kernel": kernel, "seq_len": seq_len, "block": block, "rows": rows, "heads": heads,
           "kv_heads": kv_heads, "head_dim": head_dim, "dtype": jnp.dtype(dtype).name}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        compiled = jax.jit(fn).lower(q, k, v).compile()
        row[f"{name}_s"] = _time(compiled, (q, k, v), repeat)
        row[f"{name}_estimate_s"] = _estimate(compiled, chip)
    return row


def run(kernels, shapes, rows: int, heads: int, kv_heads: int, head_dim: int, dtype, repeat: int,
        budget_s: float) -> dict:
    """One row per (kernel, shape); a kernel the backend cannot run, or that fails, is recorded with the reason;
    shapes not reached within ``budget_s`` are recorded as skipped."""
    from benchmarks.common import device_chip

    chip = device_chip()
    deadline = time.perf_counter() + budget_s
    out = {"device": jax.devices()[0].device_kind, "chip": chip.name if chip else None,
           "estimates_are": "cost model (tidar_jax/analysis/cost_model.py): pallas_gpu charged for its visited tiles, cudnn dense",
           "rows": []}
    for seq_len, block in shapes:
        for kernel in kernels:
            if time.perf_counter() > deadline:
                out["rows"].append({"kernel": kernel, "seq_len": seq_len, "skipped": "section budget spent"})
                continue
            try:
                out["rows"].append(measure(kernel, seq_len, block, rows, heads, kv_heads, head_dim, dtype, repeat,
                                           chip))
            except Exception as e:  # one kernel failing must not lose the others' figures
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                out["rows"].append({"kernel": kernel, "seq_len": seq_len, "error": first[:300]})
    return out


def rank(chips, kernels=GPU_KERNELS, seq_len: int = 4096, block: int = 16, rows: int = 1) -> dict:
    """The cost model's estimate of each kernel's forward + backward (the section's ``fwd_bwd`` program) at the
    1.5B attention shape, compiled deviceless for each chip: the ``choice`` ranking record. A kernel that does
    not compile there (cudnn without cuDNN installed) gets the reason instead of a time."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from tidar_jax.attention import choice
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram

    layout = masks.training_layout(seq_len, block)
    estimates, assumptions = {}, {}
    for chip in chips:
        target = targets.parse_target(chip)
        sh = NamedSharding(Mesh(np.array(targets.target_devices(target)[:1]), ("x",)), P())
        q = jax.ShapeDtypeStruct((rows, layout.q_len, HEADS, HEAD_DIM), jnp.bfloat16, sharding=sh)
        k = jax.ShapeDtypeStruct((rows, layout.k_len, KV_HEADS, HEAD_DIM), jnp.bfloat16, sharding=sh)
        estimates[chip] = {}
        for kernel in kernels:
            t0 = time.perf_counter()
            try:
                with targets.compiling_for(target):
                    compiled = jax.jit(programs(kernel, layout)[1]).lower(q, k, k).compile()
            except Exception as e:  # noqa: BLE001 -- recorded: a kernel this machine cannot compile is not ranked
                estimates[chip][kernel] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                print(f"{chip} {kernel}: not compiled: {estimates[chip][kernel]}", file=sys.stderr, flush=True)
                continue
            est = estimate(HloProgram.of(compiled), target.chip)
            estimates[chip][kernel], assumptions[chip] = est.time_s, est.assumptions.line()
            print(f"{chip} {kernel}: {est.time_s * 1e3:.3f} ms estimated (compiled in "
                  f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    import importlib.util

    shape = {"seq_len": seq_len, "block": block, "rows": rows, "heads": HEADS, "kv_heads": KV_HEADS,
             "head_dim": HEAD_DIM, "dtype": "bfloat16", "program": "forward + backward (fwd_bwd)",
             # cudnn compiles only where cuDNN is importable (docs/attention.md: not in the requirements)
             "cudnn_importable": importlib.util.find_spec("nvidia.cudnn") is not None}
    return choice.ranking_record(estimates, "python -m benchmarks.attention_kernels --rank " + " ".join(chips),
                                     shape, assumptions)


TRITON = ("custom-call:__gpu$xla.gpu.triton", "custom-call:triton_kernel_call_ffi")  # jax 0.10, 0.11


def visited_fraction(seq_len: int, block: int, objective: str, tile_q: int, tile_k: int) -> float:
    """The share of (query tile, key tile) pairs the kernel visits on the objective's layout."""
    from tidar_jax.attention.schedule import tile_schedule

    layout = masks.training_layout(seq_len, block) if objective == "tidar" else masks.causal_layout(seq_len)
    return tile_schedule(layout, tile_q, tile_k).visited_fraction


def train_step_estimate(config: str, target_name: str, objective: str, kernel: str = "pallas_gpu") -> dict:
    """The cost model's estimate of the real train step (``train.py --plan --target``'s program) with the
    attention kernels' share; the Pallas kernels are charged for the tiles they visit (they declare their FLOPs
    to the cost model, ``tidar_jax.analysis.kernel_costs``), whose share of all tile pairs is recorded beside."""
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.train.config import load_config
    from tidar_jax.train.flops import model_flops
    from tidar_jax.analysis.train_plan import compile_train_step

    target = targets.parse_target(target_name)
    cfg = load_config(config, [f"model.attention={kernel}", f"train.objective={objective}"])
    with targets.compiling_for(target):
        compiled, _, ctx = compile_train_step(cfg, devices=targets.target_devices(target))
    est = estimate(HloProgram.of(compiled), target.chip)
    mcfg = ctx["mcfg"]
    tiles = pallas_gpu.TILES.get(target.chip.name, pallas_gpu.TILES[pallas_gpu.DEFAULT_TARGET])
    frac = {"fwd": visited_fraction(cfg.data.seq_len, mcfg.block_size, objective, tiles.fwd_q, tiles.fwd_k),
            "bwd": visited_fraction(cfg.data.seq_len, mcfg.block_size, objective, tiles.bwd_q, tiles.bwd_k)}
    attn = [k for k in est.kernels if k.kind in TRITON and "tidar_flash" in k.op_name]
    attn_s = sum(k.total_time_s for k in attn)
    useful = model_flops(mcfg, cfg.data.global_batch, cfg.data.seq_len, objective)
    from tidar_jax.analysis.chips import chip_costs

    peak = chip_costs(target.chip).peak_bf16_flops * target.count
    return {"config": config, "target": target.name, "objective": objective, "kernel": kernel,
            "step_s": est.time_s, "mfu": useful / (est.time_s * peak), "attention_s": attn_s,
            "attention_share": attn_s / est.time_s, "visited_fraction": frac,
            "collective_s": est.time_by("collective"), "assumptions": est.assumptions.line(),
            "attention_kernels": [{"op_name": k.op_name, "runs": k.runs, "flops": k.flops, "time_s": k.time_s,
                                   "bound": k.bound} for k in attn]}


def _section(data: dict | None) -> dict | None:
    """The attention section: inside the suite's ``accelerator.json``, or a standalone ``attention_kernels.json``."""
    if not isinstance(data, dict):
        return None
    if "sections" in data:
        sec = data["sections"].get("attention_kernels") or {}
        return sec if sec.get("status") == "ok" else None
    return data if "rows" in data else None


def measured_order(section: dict, chip: str | None) -> tuple[str, ...] | None:
    """The ranking the measurement gives for ``chip`` (None when the section is for another chip or ran
    nothing): kernels that ran, fastest forward + backward first; then the fallback kernels it has no time for;
    then kernels that only failed there."""
    if chip is None or section.get("chip") != chip:
        return None
    times: dict[str, dict[int, float]] = {}
    failed = set()
    for row in section.get("rows", []):
        if isinstance(row.get("fwd_bwd_s"), (int, float)) and math.isfinite(row["fwd_bwd_s"]):
            times.setdefault(row["kernel"], {})[row["seq_len"]] = row["fwd_bwd_s"]
        elif "error" in row:
            failed.add(row["kernel"])
    if not times:
        return None
    common = set.intersection(*(set(t) for t in times.values()))
    if not common:  # no sequence length every kernel ran: compare the longest each ran (a coarser ranking)
        total = {k: t[max(t)] for k, t in times.items()}
    else:
        total = {k: sum(t[s] for s in common) for k, t in times.items()}
    ran = tuple(sorted(total, key=total.get))
    failed -= set(ran)
    rest = tuple(k for k in choice.GPU_FALLBACK if k not in ran and k not in failed)
    return ran + rest + tuple(sorted(failed))


def record_measurement(record: dict, section: dict, command: str) -> dict:
    """``record`` (a ``gpu_ranking.json`` record) with the chip of the accelerator suite's attention ``section``
    ranked by that measurement (``measured_order``); unchanged when the section ranks nothing."""
    chip = section.get("chip")
    order = measured_order(section, chip)
    if not order:
        return record
    chips = dict(record.get("chips", {}))
    chips[chip] = {"ranking": list(order), "measured_on": section.get("device"), "command": command}
    return {**record, "chips": chips}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output directory (--estimate)")
    p.add_argument("--estimate", metavar="TARGET", default=None,
                   help="instead of timing: the cost model's TiDAR and AR train-step estimates with pallas_gpu on "
                        "TARGET (e.g. h100x8) for --config and the attention kernels' share")
    p.add_argument("--config", default="configs/qwen2.5-1.5b-tidar.yaml")
    p.add_argument("--rank", metavar="CHIP", nargs="+", default=None,
                   help="instead of timing: the cost model's ranking of the GPU kernels per chip (e.g. h100 h200 "
                        "a100 b200), written to tidar_jax/attention/gpu_ranking.json (what auto reads on a GPU)")
    p.add_argument("--record-measured", metavar="RESULTS_JSON", default=None,
                   help="take the measured ranking of an accelerator.json (or attention_kernels.json) from a lent "
                        "device into tidar_jax/attention/gpu_ranking.json, for its chip")
    args = p.parse_args(argv)
    if args.record_measured:
        from tidar_jax.attention import choice

        with open(args.record_measured) as f:
            section = _section(json.load(f))
        if section is None or not measured_order(section, section.get("chip")):
            raise SystemExit(f"--record-measured {args.record_measured!r}: no attention section that ran a kernel "
                             "on a listed chip")
        with open(choice.RANKING_FILE) as f:
            record = json.load(f)
        command = "python -m benchmarks.attention_kernels --record-measured " + os.path.basename(args.record_measured)
        choice.write_ranking(record_measurement(record, section, command))
        print(json.dumps(record_measurement(record, section, command)["chips"][section["chip"]], indent=1))
        return 0
    if args.rank:
        from tidar_jax.attention import choice

        bad = [c for c in args.rank if c not in targets.CHIPS or targets.CHIPS[c].platform != "gpu"]
        if bad:
            raise SystemExit(f"--rank {bad[0]!r}: must be among "
                             f"{', '.join(c for c, chip in targets.CHIPS.items() if chip.platform == 'gpu')}")
        record = rank(args.rank)
        choice.write_ranking(record)
        print(json.dumps(record["chips"], indent=1))
        return 0
    if not args.estimate or not args.out:
        raise SystemExit("give --estimate TARGET --out DIR, --rank CHIP.. or --record-measured RESULTS_JSON "
                         "(the timing is the suite's attention_kernels section)")
    rows = [train_step_estimate(args.config, args.estimate, obj) for obj in ("tidar", "ar")]
    rows.append({"tidar_over_ar": rows[0]["step_s"] / rows[1]["step_s"]})
    atomic.write_json(os.path.join(args.out, "attention_estimate.json"), rows, indent=1)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
