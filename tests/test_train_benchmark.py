"""Smoke test of benchmarks/train_step.py at a tiny size: it runs, and the numbers it writes are consistent."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 17 s; the step itself is covered by tests/test_train_step.py
def test_train_step_benchmark_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--rounds", "2", "--out", str(tmp_path),
           "model.vocab_size=128", "model.hidden_size=32", "model.num_layers=1", "model.mlp_size=64",
           "data.seq_len=16", "data.global_batch=2", "mesh.data=1"]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "train_step.json").read_text())
    for objective in ("tidar", "ar"):
        assert result[objective]["median_s"] > 0
        assert result[objective]["tokens_per_s"] == 2 * 16 / result[objective]["median_s"]
    assert result["ratio_tidar_over_ar"] == result["tidar"]["median_s"] / result["ar"]["median_s"]
    assert "TiDAR / AR step-time ratio" in (tmp_path / "train_step.md").read_text()


def test_kernel_sweep_arguments_and_tile_fractions():
    """--kernels / --seq-lens parsing (one clear line on bad input) and the tile fractions the sweep reports."""
    import pytest
    from benchmarks import train_step

    assert train_step._parse_kernel("blockwise@256") == ("blockwise", 256)
    assert train_step._parse_kernel("reference") == ("reference", None)
    for bad in ("flash", "reference@128", "blockwise@0", "blockwise@x"):
        with pytest.raises(SystemExit, match=r"--kernels entry .*: must be one of"):
            train_step._parse_kernel(bad)
    with pytest.raises(SystemExit, match=r"--seq-lens='512,x': must be a comma list of positive integers"):
        train_step._positive_ints("512,x", "--seq-lens")
    tidar, causal = train_step._tile_fractions(4096, 16, 128)
    assert round(100 * tidar, 1) == 26.6  # kernels.md, measured
    assert causal == (32 * 33 / 2) / 32 ** 2  # the AR step's causal S=4096: the lower triangle of 32x32 tiles
