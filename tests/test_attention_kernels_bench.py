"""The accelerator suite's attention-kernel section (benchmarks/attention_kernels.py) on CPU with tiny shapes."""

import json

import jax.numpy as jnp

from benchmarks import attention_kernels


def test_section_times_each_kernel_and_records_failures():
    """CPU: blockwise and reference timed (pallas_gpu, interpreted, runs in ``--smoke``; its numerics are
    tests/test_attention_pallas_gpu.py's); cudnn cannot run here and is recorded as such."""
    result = attention_kernels.run(("blockwise", "reference", "cudnn"), ((8, 4),), 1, 2, 1, 16, jnp.float32,
                                   1, budget_s=120)
    rows = {r["kernel"]: r for r in result["rows"]}
    assert result["chip"] is None  # a CPU is no listed chip: no estimate
    for kernel in ("blockwise", "reference"):
        r = rows[kernel]
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
        assert r["fwd_estimate_s"] is None and r["seq_len"] == 8
    assert "needs an NVIDIA GPU" in rows["cudnn"]["error"]  # recorded, not raised
    json.dumps(result)


def test_section_records_skips_when_the_budget_is_spent():
    result = attention_kernels.run(("blockwise",), ((8, 4),), 1, 2, 1, 16, jnp.float32, 1, budget_s=-1)
    assert result["rows"] == [{"kernel": "blockwise", "seq_len": 8, "skipped": "section budget spent"}]
