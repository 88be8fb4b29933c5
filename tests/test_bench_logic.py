"""The benchmark scripts' own logic, checked against independent references: interleaving, the block-size
recommendation, the free-slot summary, greedy agreement, the profiler's timed
forward (it must be the real model forward over a real cache) and the plots."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from flax import nnx
from hypothesis import strategies as st

from benchmarks import plots
from benchmarks import common as bc
from benchmarks import free_slots as fs
from benchmarks import vs_transformers as vt

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import KVCache, causal_mask
from cli_output import user_lines


def test_interleaved_calls_each_candidate_every_round_in_rotated_order():
    calls = []
    cands = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bc.interleaved(cands, rounds=4, warmup=1, sync=lambda r: r)
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_stats_percentiles():
    s = bc.stats([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["min"], s["p25"], s["median"], s["n"]) == (1.0, 2.0, 3.0, 5)


def test_query_grid_is_powers_of_two_up_to_cap():
    assert fs.query_grid(1) == [1]
    assert fs.query_grid(512) == [2 ** i for i in range(10)]
    assert fs.query_grid(100) == [1, 2, 4, 8, 16, 32, 64]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 50.0), st.floats(1.0, 16.0)), min_size=1, max_size=5),
       st.floats(0.5, 20.0))
def test_recommendation_maximises_expected_tokens_per_second(block_stats, ar_ms):
    blocks = list(range(2, 2 + len(block_stats)))
    latency = {("plain", 64, 1): ar_ms}
    acceptance = {}
    for b, (step_ms, acc) in zip(blocks, block_stats):
        latency[("tidar_step", 64, b * (b + 1))] = step_ms
        acceptance[b] = {"mean_accepted": acc}
    rec = fs.recommend(latency, acceptance, [64], blocks, trained_block=None)
    info = rec["per_context"]["64"]
    # reference: tokens/s of each block computed directly
    tps = {b: acc * 1000.0 / step_ms for b, (step_ms, acc) in zip(blocks, block_stats)}
    assert tps[info["best_block_size"]] == pytest.approx(max(tps.values()))
    for row in info["blocks"]:
        step_ms, acc = block_stats[blocks.index(row["block_size"])]
        assert row["expected_tokens_per_s"] == pytest.approx(tps[row["block_size"]])
        assert row["expected_speedup_vs_ar"] == pytest.approx(acc * ar_ms / step_ms)
    assert rec["best_block_size"] == info["best_block_size"]
    assert info["ar_tokens_per_s"] == pytest.approx(1000.0 / ar_ms)


def test_recommendation_votes_across_contexts_and_flags_untrained_block():
    latency, acceptance = {}, {2: {"mean_accepted": 1.5}, 4: {"mean_accepted": 3.0}}
    for ctx, (s2, s4) in {16: (1.0, 1.0), 64: (1.0, 1.2), 256: (1.0, 4.0)}.items():  # B=4 wins at 16 and 64
        latency[("plain", ctx, 1)] = 1.0
        latency[("tidar_step", ctx, 6)] = s2
        latency[("tidar_step", ctx, 20)] = s4
    rec = fs.recommend(latency, acceptance, [16, 64, 256], [2, 4], trained_block=2)
    assert [rec["per_context"][c]["best_block_size"] for c in ("16", "64", "256")] == [4, 4, 2]
    assert rec["best_block_size"] == 4
    assert "trained with block size 2" in rec["note"]


def test_free_slot_summary_hand_case():
    lat = {("plain", 8, q): ms for q, ms in {1: 1.0, 2: 1.05, 4: 1.4, 8: 1.9, 16: 3.0}.items()}
    out = fs.free_slot_summary(lat, [8], [1, 2, 4, 8, 16])
    assert out["8"] == {"max_q_within_1.1x": 2, "max_q_within_1.5x": 4, "max_q_within_2.0x": 8}


def _tiny_cfg(**kw):
    return ModelConfig(**{**bc.PRESETS["tiny"], **kw})


@pytest.mark.parametrize("block,beta", [(2, 1.0), (4, 1.0), (3, 0.0)])
def test_step_inputs_are_the_engine_layout(block, beta):
    cfg = _tiny_cfg()
    tokens, positions, mask, rows = bc.step_inputs(cfg, 1, 10, block, np.random.default_rng(0), beta)
    q = block * (block + 1)
    assert tokens.shape == (1, q) and (tokens[0, block:] == cfg.mask_token_id).all()
    np.testing.assert_array_equal(positions, masks.decode_positions(jnp.array([10]), block))
    np.testing.assert_array_equal(mask, masks.decode_mask(jnp.array([10]), block, 10))
    assert rows.shape == (1, bc.head_rows(block, beta)) == (1, (2 if beta == 1.0 else 3) * block)
    assert rows.max() < q


def test_plain_forward_over_cache_equals_full_causal_forward():
    """The profiler times ``common.forward`` over [cache | Q tokens]; with a real cache it must give the model's own
    causal logits of the last Q positions (so the timed work is the genuine forward)."""
    with jax.enable_x64(True):
        cfg = _tiny_cfg(dtype="float64", param_dtype="float64")
        bundle = bc.random_bundle("tiny", seed=3, dtype="float64", param_dtype="float64")
        graphdef, params = bundle.graphdef, bundle.params
        rng = np.random.default_rng(1)
        ctx, q = 7, 5
        seq = rng.integers(2, cfg.vocab_size, (1, ctx + q)).astype(np.int32)
        pos = np.arange(ctx + q, dtype=np.int32)[None]

        @jax.jit
        def reference(params, seq, pos):  # full causal forward, and the K/V of the first ctx tokens
            model = nnx.merge(graphdef, params)
            logits, _ = model(seq, pos, causal_mask(1, ctx + q))
            _, kv = model.hidden(seq[:, :ctx], pos[:, :ctx], causal_mask(1, ctx))
            return logits, kv

        full, kv = reference(params, jnp.asarray(seq), jnp.asarray(pos))
        cache = KVCache(kv.k_LNTKD, kv.v_LNTKD, jnp.array([ctx], jnp.int32))
        tokens, positions, mask, rows = bc.plain_inputs(cfg, 1, ctx, q, rng)
        tokens = seq[:, ctx:]  # the same continuation as the full forward
        out = jax.jit(bc.forward, static_argnums=0)(graphdef, params, cache, jnp.asarray(tokens),
                                                     jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(rows))
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, ctx:]), rtol=1e-10, atol=1e-10)


def test_agreement_prefixes():
    a = vt.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert a == {"all_equal": False, "rows_equal": 1, "rows": 2, "common_prefix": [3, 1]}
    assert vt.agreement([[7]], [[7]])["all_equal"]


def test_heldout_prompts_fall_back_to_random_ids_without_mask_token():
    cfg = _tiny_cfg(vocab_size=8, mask_token_id=3)
    prompts, where = bc.heldout_prompts(cfg, None, 16, 32, seed=0)
    arr = np.asarray(prompts)
    assert arr.shape == (16, 32) and "random" in where
    assert arr.min() >= 0 and arr.max() < 8 and not (arr == 3).any()


def test_plots_write_png_files(tmp_path):
    rows = [{"kind": "plain", "context": c, "query_tokens": q, "p25_ms": 1.0 + q * c / 1000, "block_size": ""}
            for c in (16, 64) for q in (1, 2, 4)]
    rows += [{"kind": "tidar_step", "context": 16, "query_tokens": 6, "p25_ms": 1.2, "block_size": 2}]
    rec = {"best_block_size": 2, "per_context": {"16": {"ar_tokens_per_s": 900.0, "blocks": [
        {"block_size": 2, "expected_tokens_per_s": 1200.0}]}}}
    with open(plots.latency_curve(rows, rec, str(tmp_path / "a.png")), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["a.png"]  # no temp files left behind


def test_write_json_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "r" / "x.json"
    bc.write_json(str(path), {"a": np.float32(1.5), "b": np.arange(2)})
    bc.write_json(str(path), {"a": 2})
    import json
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path / "r") == ["x.json"]


def test_shared_options_are_declared_once_and_changed_only_in_default_or_help():
    import argparse

    from benchmarks import cli

    p = cli.add_shared(argparse.ArgumentParser(), "preset", "rounds", "new_tokens", "out",
                       rounds=dict(default=10, help="timed rounds"))
    args = p.parse_args(["--new-tokens", "7"])
    assert (args.preset, args.rounds, args.new_tokens, args.out) == (None, 10, 7, cli.DEFAULT_OUT)
    assert p.parse_args(["--rounds", "3"]).rounds == 3  # still an int
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "nope"])  # choices are the presets common builds
    assert sorted(cli.SHARED["preset"]["choices"]) == sorted(bc.PRESETS)
    for bad in (dict(names=("bogus",), changes={}), dict(names=("rounds",), changes={"seed": {"default": 1}}),
                dict(names=("rounds",), changes={"rounds": {"type": float}})):
        with pytest.raises(KeyError):
            cli.add_shared(argparse.ArgumentParser(), *bad["names"], **bad["changes"])


def test_require_positive_names_the_first_bad_option_and_skips_unset_ones():
    import argparse

    from benchmarks import cli

    cli.require_positive(argparse.Namespace(rounds=1, block_size=None), ("rounds", "block_size"))
    with pytest.raises(SystemExit, match=r"^error: --new-tokens=0: must be an integer >= 1$"):
        cli.require_positive(argparse.Namespace(rounds=2, new_tokens=0, seed=-1), ("rounds", "new_tokens", "seed"))


def test_no_benchmark_touches_sys_path_nor_silences_import_order():
    """The benchmarks run as modules of the package from the repository root (``python -m benchmarks.<name>``):
    none edits sys.path, and none needs an import-order exemption."""
    bench = os.path.dirname(bc.__file__)
    files = [os.path.join(d, n) for d, _, names in os.walk(bench) for n in names if n.endswith((".py", ".sh"))]
    offenders = [f for f in sorted(files) if "sys.path" in open(f).read() or "E402" in open(f).read()]
    assert offenders == []


def test_a_benchmark_runs_as_a_module(tmp_path):
    """``python -m benchmarks.prepare`` imports the package of this checkout and reaches its CLI check; prepare is
    the lightest script (no jax before parsing)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(bc.__file__))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.prepare", "--mb", "0", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and user_lines(proc.stderr) == ["error: --mb=0: must be an integer >= 1"], proc.stderr
    assert os.listdir(tmp_path) == []
