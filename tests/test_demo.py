"""The demo's speed-limit statement: perfect-draft speedup = B / (step cost in 1-token forwards)."""

import pytest

from tidar_jax.demo import speed_limits


def _summary(ar_wall, tidar_wall, tnfe):
    return {"modes": {"ar": {"median_wall_s": ar_wall, "speedup_vs_ar": 1.0, "tokens_per_nfe": 1.0},
                      "tidar_lossless": {"median_wall_s": tidar_wall, "speedup_vs_ar": ar_wall / tidar_wall,
                                         "tokens_per_nfe": tnfe}}}


def test_perfect_draft_speedup_is_block_over_step_cost():
    # AR: 64 forwards in 1.0 s; TiDAR: 32 forwards in 1.5 s -> a step costs 3 AR forwards
    lim = speed_limits(_summary(1.0, 1.5, 2.0), {"ar": 64, "tidar_lossless": 32}, block=4)
    assert lim["step_cost_in_ar_forwards"] == pytest.approx(3.0)
    assert lim["perfect_draft_speedup"] == pytest.approx(4 / 3)
    assert lim["achieved_speedup"] == pytest.approx(1 / 1.5)
    assert lim["limited_by"] == "both"


def test_limit_named():
    # cheap steps, poor drafts: the drafts limit
    assert speed_limits(_summary(1.0, 1.0, 1.2), {"ar": 64, "tidar_lossless": 53}, 8)["limited_by"] == "the drafts"
    # a step costing more than B forwards: no drafts could help
    lim = speed_limits(_summary(1.0, 5.0, 4.0), {"ar": 64, "tidar_lossless": 16}, 4)
    assert lim["perfect_draft_speedup"] < 1 and lim["limited_by"].startswith("the hardware")
