"""Section 6: the decode step at the 1.5B and 8B shapes (AR and TiDAR at B = 4, 8, 16, batch 1 and 8, context
1024 and 4096), each measured beside the cost model's estimate of the same compiled step
(benchmarks/gpu_decode_step.py does the work; this section gives it the suite's budget). A shape whose turn comes
after the budget is spent is recorded as skipped."""

from __future__ import annotations

from benchmarks import gpu_decode_step
from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)

# (preset, block sizes, batches, contexts, rounds, seconds the preset needs at least)
DEVICE_GRID = (("qwen2.5-1.5b", (4, 8, 16), (1, 8), (1024, 4096), 20, 60.0),
               ("qwen3-8b", (4, 8, 16), (1, 8), (1024, 4096), 10, 90.0))
SMOKE_GRID = (("tiny", (4,), (1,), (16,), 1, 0.0),)


def section_decode_step(ctx, deadline: Deadline) -> dict:  # noqa: F405
    grid = SMOKE_GRID if ctx.args.smoke else DEVICE_GRID
    dtype = "float32" if ctx.args.smoke else "bfloat16"
    rows, skipped = [], []
    for preset, blocks, batches, contexts, rounds, needs_s in grid:
        if deadline.left() < needs_s:
            skipped.append({"preset": preset, "reason": f"budget: {deadline.left():.0f} s left, needs {needs_s:.0f}"})
            continue
        rows += gpu_decode_step.run_preset(preset, blocks, batches, contexts, rounds, dtype)
    return {"dtype": dtype, "cases": rows, "skipped": skipped,
            "estimates_are": "cost model of the compiled step (tidar_jax/analysis/cost_model.py); an estimate"}
