"""Section 5: the training attention kernels (pallas_gpu, cudnn, blockwise), forward and forward+backward at the
paper's shapes, each time beside the cost model's estimate of the same compiled program
(benchmarks/attention_kernels.py does the timing; this section gives it the suite's budget and shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import attention_kernels as ak
from benchmarks.common import *  # noqa: F403 (the suite's shared constants and helpers)


def section_attention_kernels(ctx, deadline: Deadline) -> dict:  # noqa: F405
    if ctx.args.smoke:  # tiny shapes: the kernels a CPU runs natively (pallas_gpu's numerics are tested apart)
        return ak.run(("blockwise", "reference"), ((16, 4),), 1, 2, 1, 16, jnp.float32, 1, deadline.left())
    kernels = ak.GPU_KERNELS if jax.default_backend() == "gpu" else ("blockwise",)
    return ak.run(kernels, ak.SHAPES, 1, ak.HEADS, ak.KV_HEADS, ak.HEAD_DIM, jnp.bfloat16, 5, deadline.left())
