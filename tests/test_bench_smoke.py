"""Smoke tests: every benchmark script runs end to end at its tiniest size (so the scripts cannot rot), writes
the files it promises, and what it reports obeys the invariants that hold for any machine:
  * lossless TiDAR output == our AR output == transformers' greedy output on the exported weights;
  * the recommendation picks a candidate block size; the random model is labelled as such;
  * bad input exits non-zero with one line naming the value.
Timings are never asserted."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from cli_output import user_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's run
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    module = "benchmarks." + os.path.splitext(script)[0]
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # 13 s; its logic is covered by tests/test_bench_logic.py
def test_free_slots_tiny(tmp_path):
    proc = run("free_slots.py", "--tiny", "--contexts", "8,16", "--out", tmp_path)
    assert "RANDOM-INIT" in proc.stderr + proc.stdout
    with open(tmp_path / "free_slots.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 contexts x (Q in {1, 2} plain + one TiDAR step at B=2, Q=6)
    assert sorted((int(r["context"]), r["kind"], int(r["query_tokens"])) for r in rows) == sorted(
        [(c, "plain", q) for c in (8, 16) for q in (1, 2)] + [(c, "tidar_step", 6) for c in (8, 16)])
    for r in rows:
        assert 0 < float(r["min_ms"]) <= float(r["p25_ms"]) <= float(r["median_ms"])
    res = json.loads((tmp_path / "free_slots.json").read_text())
    assert res["model"]["trained"] is False and res["warning"]
    assert res["recommendation"]["best_block_size"] == 2
    acc = res["acceptance"]["per_block"]["2"]
    assert 1.0 <= acc["mean_accepted"] <= 2.0
    assert res["machine"]["cpu_threads"] >= 1 and res["machine"]["load_average_1_5_15"] is not None
    assert is_png(tmp_path / "free_slots.png")


@pytest.mark.slow  # 15 s; greedy parity with transformers is covered by tests/test_hf_roundtrip.py
def test_vs_transformers_tiny_greedy_outputs_agree(tmp_path):
    run("vs_transformers.py", "--tiny", "--out", tmp_path)
    res = json.loads((tmp_path / "vs_transformers.json").read_text())
    agree = res["greedy_agreement"]
    assert agree["ours_ar_vs_transformers"]["all_equal"], agree
    assert agree["ours_tidar_vs_ours_ar"]["all_equal"], agree  # lossless mode
    assert res["settings"]["torch_threads"] == res["settings"]["xla_cpu_threads"]
    assert set(res["speed"]) == {"transformers", "ours_ar", "ours_tidar"}
    assert all(v["tokens_per_s"] > 0 for v in res["speed"].values())


@pytest.mark.parametrize("script,args,needle", [
    ("free_slots.py", ["--contexts", "0"], "--contexts"),
    ("decode_modes.py", ["--modes", "fast"], "--modes"),
    ("free_slots.py", ["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
])
def test_bad_input_is_one_line_and_nonzero(script, args, needle, tmp_path):
    proc = run(script, *args, "--out", tmp_path, check=False)
    assert proc.returncode != 0
    err = user_lines(proc.stderr)
    assert len(err) == 1 and needle in err[0] and "Traceback" not in proc.stderr, proc.stderr
