"""The demo's speed statements: perfect-draft speedup = B / (step cost in 1-token forwards), per-slot acceptance
from the accepted-length histogram, and the GPU estimate read from the cost model's results file (or 'unavailable')."""

import json

import pytest

from tidar_jax.demo import gpu_estimate, per_position_acceptance, speed_limits


def _timed(ar_wall, ar_forwards, tidar_wall, tidar_forwards, tnfe):
    return {"ar": {"wall_s": ar_wall, "forwards": ar_forwards, "speedup_vs_ar": 1.0, "tokens_per_nfe": 1.0},
            "tidar_lossless": {"wall_s": tidar_wall, "forwards": tidar_forwards, "speedup_vs_ar": ar_wall / tidar_wall,
                               "tokens_per_nfe": tnfe}}


def test_perfect_draft_speedup_is_block_over_step_cost():
    # AR: 64 forwards in 1.0 s; TiDAR: 32 forwards in 1.5 s -> a step costs 3 AR forwards
    lim = speed_limits(_timed(1.0, 64, 1.5, 32, 2.0), block=4)
    assert lim["step_cost_in_ar_forwards"] == pytest.approx(3.0)
    assert lim["perfect_draft_speedup"] == pytest.approx(4 / 3)
    assert lim["achieved_speedup"] == pytest.approx(1 / 1.5)
    assert lim["limited_by"] == "both"


def test_limit_named():
    # cheap steps, poor drafts: the drafts limit
    assert speed_limits(_timed(1.0, 64, 1.0, 53, 1.2), 8)["limited_by"] == "the drafts"
    # a step costing more than B forwards: no drafts could help
    lim = speed_limits(_timed(1.0, 64, 5.0, 16, 4.0), 4)
    assert lim["perfect_draft_speedup"] < 1 and lim["limited_by"].startswith("the hardware")


def test_per_position_acceptance_from_histogram():
    # B=4: 10 steps accepted 1 (slot 1 rejected), 6 accepted 2, 0 accepted 3, 4 accepted all 4
    acc = per_position_acceptance({"1": 10, "2": 6, "3": 0, "4": 4}, 4)
    assert acc == pytest.approx([10 / 20, 4 / 10, 4 / 4])
    assert per_position_acceptance({"1": 5}, 3) == [0.0, None]  # slot 2 never reached


def test_gpu_estimate_reads_the_cost_model_or_says_unavailable(tmp_path):
    path = tmp_path / "gpu_decode_estimate.json"
    missing = gpu_estimate(2.0, 4, str(path))
    assert not missing["available"] and "absent" in missing["why"]
    row = {"target": "h100", "shape": "qwen2.5-1.5b", "batch": 1, "context": 1024}
    path.write_text(json.dumps({"assumptions": "HBM-bound AR step",
                                "rows": [{**row, "block_size": 4, "tidar_over_ar_step": 1.25},
                                         {**row, "block_size": 8, "tidar_over_ar_step": 1.6},
                                         {**row, "batch": 8, "block_size": 16, "tidar_over_ar_step": 3.0}]}))
    est = gpu_estimate(2.5, 4, str(path))
    assert est["available"] and est["speedup"] == pytest.approx(2.0) and est["assumptions"] == ["HBM-bound AR step"]
    no_b = gpu_estimate(2.5, 16, str(path))
    assert not no_b["available"] and "B=16" in no_b["why"]
