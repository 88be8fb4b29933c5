"""``model.attention=auto`` on a GPU (``tidar_jax.attention.choice``): it follows the recorded ranking that
ships with the package for the chip being built for (the cost model's, or a lent device's measurement once it is
taken into the table by ``benchmarks.attention_kernels --record-measured``; a results file in the checkout alone
changes nothing), else the fixed order; the chip comes from the deviceless target (or the local GPU), and so do
the Pallas kernel's tile sizes. No device and no compile."""

from __future__ import annotations

import json
import os

import pytest

from tidar_jax import attention, targets
from tidar_jax.attention import choice, pallas_gpu

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


def _record(results: str, ranking) -> None:
    """The deliberate step: ``--record-measured`` takes ``results`` into the table at ``ranking``."""
    from benchmarks import attention_kernels

    assert attention_kernels.main(["--record-measured", results]) == 0


def test_auto_follows_a_recorded_measurement(tmp_path, monkeypatch):
    rows = [_row("pallas_gpu", 2048, 0.004), _row("pallas_gpu", 4096, 0.012),
            _row("blockwise", 2048, 0.003), _row("blockwise", 4096, 0.010),
            {"kernel": "cudnn", "seq_len": 2048, "error": "cuDNN could not build the graph"}]
    ranking = tmp_path / "gpu_ranking.json"
    ranking.write_text(open(choice.RANKING_FILE).read())
    monkeypatch.setattr(choice, "RANKING_FILE", str(ranking))
    before = choice.preference("h100")
    path = _write_suite_results(tmp_path, "h100", H100_KIND, rows)
    assert choice.preference("h100") == before  # a results file alone is never read
    _record(path, ranking)
    order, source = choice.preference("h100")
    assert order == ("blockwise", "pallas_gpu", "cudnn") and source.startswith("measured on " + H100_KIND)
    assert _auto_for("h100x8") == "blockwise"

    for r in rows:  # the measurement the other way round: the choice turns with it
        if r["kernel"] == "pallas_gpu":
            r["fwd_bwd_s"] /= 10
    _record(_write_suite_results(tmp_path, "h100", H100_KIND, rows), ranking)
    assert choice.preference("h100")[0][0] == "pallas_gpu"
    assert _auto_for("h100") == "pallas_gpu"

    # a chip the measurement did not cover keeps its recorded ranking (or the fixed order)
    shipped = json.load(open(os.path.join(os.path.dirname(choice.__file__), "gpu_ranking.json")))
    assert choice.preference("a100")[0] == (choice.ranked_order(shipped, "a100") or choice.GPU_FALLBACK)


def test_measurement_compares_the_lengths_every_kernel_ran(tmp_path):
    """A kernel timed at a length another one never reached is compared on the shared lengths only."""
    from benchmarks.attention_kernels import measured_order

    rows = [_row("pallas_gpu", 2048, 0.004), _row("blockwise", 2048, 0.005), _row("pallas_gpu", 4096, 9.0),
            {"kernel": "blockwise", "seq_len": 4096, "skipped": "section budget spent"}]
    assert measured_order({"chip": "h100", "rows": rows}, "h100")[:2] == ("pallas_gpu", "blockwise")


def test_auto_follows_the_cost_model_ranking_until_measured(tmp_path, monkeypatch):
    record = choice.ranking_record({"h100": {"pallas_gpu": 0.02, "blockwise": 0.01, "cudnn": "no cuDNN"}},
                                       "test", {}, {"h100": "-"})
    ranking = tmp_path / "gpu_ranking.json"
    choice.write_ranking(record, str(ranking))
    monkeypatch.setattr(choice, "RANKING_FILE", str(ranking))
    order, source = choice.preference("h100")
    assert order == ("blockwise", "pallas_gpu") and source.startswith("cost model")
    assert _auto_for("h100") == "blockwise"
    assert choice.preference("a100") == (choice.GPU_FALLBACK, choice.preference(None)[1])
    assert _auto_for("a100") == choice.GPU_FALLBACK[0]
    with targets.compiling_for("gpu"):  # a platform, no chip: the fixed order
        assert attention.resolve("auto") == choice.GPU_FALLBACK[0]


def test_checked_in_ranking_orders_its_own_estimates():
    """``gpu_ranking.json`` is the --rank command's output: per chip the kernels with an estimate, fastest first."""
    with open(choice.RANKING_FILE) as f:
        record = json.load(f)
    assert record["command"].startswith("python -m benchmarks.attention_kernels --rank")
    for chip, entry in record["chips"].items():
        if entry.get("measured_on"):  # a recorded measurement: its ranking is the measurement's
            continue
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
