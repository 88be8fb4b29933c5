"""``model.attention=auto`` on a GPU (``tidar_jax.attention.gpu_choice``): it follows the accelerator suite's
measurement for the chip being built for when a results file is present (written here by the suite's own writer),
else the cost model's recorded ranking, else the fixed order; the chip comes from the deviceless target (or the
local GPU), and so do the Pallas kernel's tile sizes. No device and no compile."""

from __future__ import annotations

import json
import os

import pytest

from tidar_jax import attention, targets
from tidar_jax.attention import gpu_choice, pallas_gpu

H100_KIND = targets.CHIPS["h100"].description


def _row(kernel, seq_len, fwd_bwd_s):
    """A measured row as ``benchmarks.attention_kernels.measure`` writes it."""
    return {"kernel": kernel, "seq_len": seq_len, "block": 16, "rows": 1, "heads": 12, "kv_heads": 2,
            "head_dim": 128, "dtype": "bfloat16", "fwd_s": fwd_bwd_s / 3, "fwd_estimate_s": None,
            "fwd_bwd_s": fwd_bwd_s, "fwd_bwd_estimate_s": None}


def _write_suite_results(out, chip, kind, rows):
    """``accelerator.json`` through the suite's writer, its attention section holding ``rows``."""
    from benchmarks.accelerator import driver

    args = driver.parse_args(["--out", str(out), "--sections", "attention_kernels"])
    result = {"schema_version": driver.SCHEMA_VERSION, "suite": "accelerator", "smoke": False,
              "command": driver.reproduce_command(args), "argv": [], "budget_s": 440.0, "elapsed_s": 1.0,
              "machine": {"backend": "gpu", "device_kind": kind, "device_count": 1, "jax_version": "-",
                          "jaxlib_version": "-"},
              "sections": {name: driver.empty_section(name, args) for name in driver.SECTIONS}, "plots": []}
    result["sections"]["attention_kernels"].update(
        status="ok", reason=None, device=kind, chip=chip, estimates_are="-", rows=rows)
    driver.write_outputs(result, str(out))
    return os.path.join(out, "accelerator.json")


def _auto_for(target: str) -> str:
    with targets.compiling_for(targets.parse_target(target)):
        return attention.resolve("auto")


def test_auto_follows_the_measurement(tmp_path, monkeypatch):
    rows = [_row("pallas_gpu", 2048, 0.004), _row("pallas_gpu", 4096, 0.012),
            _row("blockwise", 2048, 0.003), _row("blockwise", 4096, 0.010),
            {"kernel": "cudnn", "seq_len": 2048, "error": "cuDNN could not build the graph"}]
    path = _write_suite_results(tmp_path, "h100", H100_KIND, rows)
    monkeypatch.setenv(gpu_choice.MEASURED_ENV, path)
    order, source = gpu_choice.preference("h100")
    assert order == ("blockwise", "pallas_gpu", "cudnn") and source.startswith("measured on " + H100_KIND)
    assert _auto_for("h100x8") == "blockwise"

    for r in rows:  # the measurement the other way round: the choice turns with it
        if r["kernel"] == "pallas_gpu":
            r["fwd_bwd_s"] /= 10
    _write_suite_results(tmp_path, "h100", H100_KIND, rows)
    assert gpu_choice.preference("h100")[0][0] == "pallas_gpu"
    assert _auto_for("h100") == "pallas_gpu"

    # a chip the file did not measure takes the cost model's ranking (or the fixed order)
    ranked = gpu_choice.ranked_order(json.load(open(gpu_choice.RANKING_FILE)), "a100") \
        if os.path.exists(gpu_choice.RANKING_FILE) else None
    assert gpu_choice.preference("a100")[0] == (ranked or gpu_choice.FALLBACK)


def test_measurement_compares_the_lengths_every_kernel_ran(tmp_path):
    """A kernel timed at a length another one never reached is compared on the shared lengths only."""
    rows = [_row("pallas_gpu", 2048, 0.004), _row("blockwise", 2048, 0.005), _row("pallas_gpu", 4096, 9.0),
            {"kernel": "blockwise", "seq_len": 4096, "skipped": "section budget spent"}]
    path = _write_suite_results(tmp_path, "h100", H100_KIND, rows)
    assert gpu_choice.preference("h100", measured_path=path)[0][:2] == ("pallas_gpu", "blockwise")


def test_auto_follows_the_cost_model_ranking_until_measured(tmp_path, monkeypatch):
    record = gpu_choice.ranking_record({"h100": {"pallas_gpu": 0.02, "blockwise": 0.01, "cudnn": "no cuDNN"}},
                                       "test", {}, {"h100": "-"})
    ranking = tmp_path / "gpu_ranking.json"
    gpu_choice.write_ranking(record, str(ranking))
    monkeypatch.setattr(gpu_choice, "RANKING_FILE", str(ranking))
    monkeypatch.setenv(gpu_choice.MEASURED_ENV, str(tmp_path / "no-such-file.json"))
    order, source = gpu_choice.preference("h100")
    assert order == ("blockwise", "pallas_gpu") and source.startswith("cost model")
    assert _auto_for("h100") == "blockwise"
    assert gpu_choice.preference("a100") == (gpu_choice.FALLBACK, gpu_choice.preference(None)[1])
    assert _auto_for("a100") == gpu_choice.FALLBACK[0]
    with targets.compiling_for("gpu"):  # a platform, no chip: the fixed order
        assert attention.resolve("auto") == gpu_choice.FALLBACK[0]


def test_checked_in_ranking_orders_its_own_estimates():
    """``gpu_ranking.json`` is the --rank command's output: per chip the kernels with an estimate, fastest first."""
    with open(gpu_choice.RANKING_FILE) as f:
        record = json.load(f)
    assert record["command"].startswith("python -m benchmarks.attention_kernels --rank")
    for chip, entry in record["chips"].items():
        timed = {k: v for k, v in entry["estimate_s"].items() if isinstance(v, (int, float))}
        assert entry["ranking"] == sorted(timed, key=timed.get), chip
        assert chip in targets.CHIPS and entry["assumptions"].startswith(f"estimate for {chip}")


@pytest.mark.parametrize("kind, chip", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"),
                                        ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA H200", "h200"),
                                        ("TPU v5 lite", "v5e"), ("cpu", None), ("NVIDIA L4", None)])
def test_chip_of_device_kind(kind, chip):
    assert targets.chip_of_device_kind(kind) == chip


def test_the_target_chooses_the_chip_and_the_pallas_tiles():
    for name in ("h100x8", "a100", "b200x8"):
        target = targets.parse_target(name)
        with targets.compiling_for(target):
            assert targets.build_chip() == target.chip.name
            assert pallas_gpu.tiles_for_backend() == pallas_gpu.TILES[target.chip.name]
    with targets.compiling_for("gpu"):
        assert targets.build_chip() is None  # this host's device is a CPU
        assert pallas_gpu.tiles_for_backend() == pallas_gpu.TILES[pallas_gpu.DEFAULT_TARGET]
