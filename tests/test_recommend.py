"""decode.py --recommendation from the compiled steps: the acceptance model, the ranking, bad values."""

from __future__ import annotations

import pytest

from test_decode_support import tiny_config
from tidar_jax import targets
from tidar_jax.analysis import recommend as rec


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8846, 0.99])
@pytest.mark.parametrize("block", [2, 4, 16])
def test_tokens_per_step_model(alpha, block):
    """All groups: the truncated geometric mean (1 - a^B) / (1 - a); pruning groups never helps; alpha_for
    inverts it; with groups covering only count B nothing past the verifier token survives a rejection."""
    full = rec.expected_tokens_per_step(block, None, alpha)
    assert full == pytest.approx((1 - alpha ** block) / (1 - alpha))
    assert rec.expected_tokens_per_step(block, tuple(range(1, block + 1)), alpha) == pytest.approx(full)
    for g in range(1, block):
        assert rec.expected_tokens_per_step(block, tuple(range(1, g + 1)), alpha) <= full + 1e-12
    if 1 < full < block:
        assert rec.alpha_for(full, block) == pytest.approx(alpha, abs=1e-9)


def test_default_acceptance_is_the_papers_and_labelled():
    a = rec.acceptance((4, 8, 16), preset="qwen2.5-1.5b")
    assert a.tokens_per_step(16, None) == pytest.approx(7.45)
    assert "ASSUMED" in a.label and "7.45" in a.label
    assert a.tokens_per_step(4, None) < a.tokens_per_step(8, None) < 7.45
    with pytest.raises(ValueError, match="--acceptance"):
        rec.acceptance((4,), preset=None)
    with pytest.raises(ValueError, match="B=8"):
        rec.acceptance((4, 8), table={4: 3.0})
    assert rec.parse_tokens_per_nfe("4=3.1,16=7.45") == {4: 3.1, 16: 7.45}
    with pytest.raises(ValueError, match="'x=1'"):
        rec.parse_tokens_per_nfe("4=3,x=1")


@pytest.mark.parametrize("argv, message", [
    (["--acceptance", "1.5"], "--acceptance=1.5: must be in [0, 1)"),
    (["--blocks", "4,a"], "--blocks='4,a'"),
    (["--blocks", "1,4"], "--blocks='1,4'"),
    (["--tokens-per-nfe", "7.45"], "give B=T per block"),
    (["--tokens-per-nfe", "4=9"], "must be in [1, 4]"),
    (["--batch", "0"], "--batch=0"),
])
def test_recommendation_bad_values_are_one_line(argv, message, capsys):
    import decode

    if targets.missing_install(targets.parse_target("h100")):
        pytest.skip("no GPU compiler plugin")
    with pytest.raises(SystemExit) as e:
        decode.main(["--recommendation", "--target", "h100", "--preset", "qwen2.5-1.5b", "--blocks", "4", *argv])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_recommendation_ranks_the_compiled_steps():
    """A tiny model's AR step and TiDAR steps (B=4, all groups and groups 1..2) compiled for an H100: every row's
    tokens/s is its expected tokens per step over its estimated step time (ceiling and expected), and the winner has
    the most at the expected level."""
    reason = targets.missing_install(targets.parse_target("h100"))
    if reason:
        pytest.skip(reason)
    cfg = tiny_config(dtype="bfloat16", param_dtype="bfloat16", num_layers=1)
    accept = rec.acceptance((4,), alpha=0.7)
    out = rec.recommend(cfg, targets.target_devices("h100"), targets.CHIPS["h100"], batch=1, context=32,
                        blocks=(4,), accept=accept, max_new_tokens=8)
    assert [(r["block_size"], r["groups"]) for r in out["rows"]] == [(4, "all"), (4, "1..2")]
    for r, groups in zip(out["rows"], (None, (1, 2))):
        assert r["tokens_per_step"] == pytest.approx(rec.expected_tokens_per_step(4, groups, 0.7))
        for launch in ("eager", "graph"):
            for level in rec.LEVELS:
                step_ms = r[f"step_ms_{launch}_{level}"]
                assert step_ms > 0
                assert r[f"tokens_per_s_{launch}_{level}"] == pytest.approx(r["tokens_per_step"] / step_ms * 1e3)
            assert r[f"step_ms_{launch}_ceiling"] <= r[f"step_ms_{launch}_expected"]
        assert r["step_ms_graph_ceiling"] < r["step_ms_eager_ceiling"]
    assert out["best"] == max(out["rows"], key=lambda r: r["tokens_per_s_graph_expected"])  # ranked at expected
    text = rec.format_recommendation(out, "h100")
    assert "ESTIMATES" in text and "recommended: --block-size 4" in text
