"""The suite's driver: runs the sections within the budget and writes the JSON, markdown and plots (the package
docstring describes the suite)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import tempfile
import time
import traceback

from benchmarks import common as bc

import jax

from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)
from benchmarks.accelerator.options import parse_args  # noqa: F401 (one parser, importable without jax)
from benchmarks.accelerator.free_slots import section_free_slots
from benchmarks.accelerator.report import make_plots, markdown
from benchmarks.accelerator.roofline import section_roofline
from benchmarks.accelerator.train_throughput import section_train_throughput
from benchmarks.accelerator.trained_speedup import section_trained_speedup
from benchmarks.accelerator.attention_kernels import section_attention_kernels
from benchmarks.accelerator.decode_step import section_decode_step
from benchmarks.accelerator.calibration import section_calibration
from benchmarks.accelerator.cpu_sections import section_cpu
from benchmarks.accelerator.options import CPU_SECTIONS

# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------

SECTION_FNS = {"trained_speedup": section_trained_speedup, "free_slots": section_free_slots,
               "roofline": section_roofline, "train_throughput": section_train_throughput,
               "attention_kernels": section_attention_kernels, "decode_step": section_decode_step,
               "calibration": section_calibration,
               **{name: section_cpu(name.removeprefix("cpu_")) for name in CPU_SECTIONS}}


def machine() -> dict:
    info = bc.machine_info()
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    kind = jax.devices()[0].device_kind
    return {**info, "backend": jax.default_backend(), "device_kind": kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": jaxlib_version,
            "peak_bf16_flops_per_s": peak_flops(kind), "peak_flops_source": PEAK_SOURCE,
            "memory": memory_stats()}


def reproduce_command(args, sections=None) -> str:
    parts = ["python", "-m", "benchmarks.accelerator"]
    if args.smoke:
        parts.append("--smoke")
    parts += ["--budget-s", f"{args.budget_s:g}", "--out", args.out]
    if args.data:
        parts += ["--data", args.data]
    if args.prompt_file:
        parts += ["--prompt-file", args.prompt_file]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.quick:
        parts.append("--quick")
    if args.checkpoint:
        parts += ["--checkpoint", args.checkpoint]
    if sections:
        parts += ["--sections", ",".join(sections)]
    return shlex.join(parts)


class Context:
    def __init__(self, args, sizes: Sizes, result: dict, tmp: str):
        self.args, self.sizes, self.results, self.tmp = args, sizes, result, tmp
        self.random_models: dict[str, tuple] = {}

    def log(self, msg: str):
        print(f"[accelerator {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_outputs(result: dict, out: str):
    bc.write_json(os.path.join(out, "accelerator.json"), result)
    bc.write_text(os.path.join(out, "accelerator.md"), markdown(result))


def empty_section(name: str, args) -> dict:
    return {"status": "not_run", "reason": "not in --sections", "elapsed_s": 0.0, "process_cpu_s": 0.0,
            "allowance_s": None,
            "command": reproduce_command(args, [name])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes = SMOKE if args.smoke else DEVICE
    os.makedirs(args.out, exist_ok=True)
    result = {"schema_version": SCHEMA_VERSION, "suite": "accelerator", "smoke": args.smoke,
              "command": reproduce_command(args), "argv": sys.argv[1:] if argv is None else list(argv),
              "budget_s": args.budget_s, "elapsed_s": 0.0, "machine": machine(), "sizes": dataclasses.asdict(sizes),
              "sections": {name: empty_section(name, args) for name in SECTIONS + tuple(args.sections)},
              "plots": []}
    with tempfile.TemporaryDirectory(prefix="tidar-accel-") as tmp:
        ctx = Context(args, sizes, result, tmp)
        ctx.log(f"{result['machine']['device_count']} x {result['machine']['device_kind']} "
                f"({result['machine']['backend']}), jax {jax.__version__}; budget {args.budget_s:g} s")
        for name in args.sections:
            remaining = args.budget_s - (time.perf_counter() - t_start) - RESERVE_S
            allowance = section_allowance(remaining, name, tuple(args.sections))
            sec = result["sections"][name]
            sec["allowance_s"] = allowance
            t0, c0 = time.perf_counter(), time.process_time()
            if allowance < max(sizes.min_section_s, 1e-9):
                sec.update(status="skipped", reason=f"budget: {max(allowance, 0):.1f} s for this section, needs "
                                                    f"at least {sizes.min_section_s:g} s")
            else:
                ctx.log(f"section {name}: {allowance:.0f} s")
                try:
                    sec.update(SECTION_FNS[name](ctx, Deadline(allowance)), status="ok", reason=None)
                except SectionSkipped as e:
                    sec.update(status="skipped", reason=str(e))
                except Exception as e:  # noqa: BLE001 -- one failing section must not lose the others' evidence
                    traceback.print_exc()
                    sec.update(status="error", reason=f"{type(e).__name__}: {str(e).strip()[:500]}")
            sec["elapsed_s"] = time.perf_counter() - t0
            sec["process_cpu_s"] = time.process_time() - c0  # all threads: compile + run, whatever the load
            result["elapsed_s"] = time.perf_counter() - t_start
            ctx.log(f"section {name}: {sec['status']} in {sec['elapsed_s']:.1f} s"
                    + (f" ({sec['reason']})" if sec["reason"] else ""))
            write_outputs(result, args.out)
        ctx.random_models.clear()
    try:
        result["plots"] = make_plots(result, args.out)
    except Exception as e:  # noqa: BLE001 -- plots are a convenience; the JSON is the evidence
        traceback.print_exc()
        result["plot_error"] = f"{type(e).__name__}: {e}"
    result["elapsed_s"] = time.perf_counter() - t_start
    write_outputs(result, args.out)
    print(markdown(result), flush=True)
    return result
