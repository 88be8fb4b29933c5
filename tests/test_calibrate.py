"""Calibration: the efficiency table fitted from a profile-like record (tests/fixtures/profile_h100_tidar_step.json:
a compiled H100 TiDAR step's ceiling kernels and SYNTHESIZED per-kernel durations at known efficiencies, see
tests/fixtures/make_profile_fixture.py), written where the estimate reads it and read back by it."""

import json
import os

import pytest

from tidar_jax.analysis import calibrate, efficiency
from tidar_jax.analysis.efficiency import CeilingKernel

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "profile_h100_tidar_step.json")


@pytest.fixture(scope="module")
def recorded():
    with open(FIXTURE) as f:
        doc = json.load(f)
    return doc, [CeilingKernel(**k) for k in doc["ceiling"]]


def test_fit_recovers_the_efficiencies_the_profile_was_made_with(recorded, tmp_path):
    doc, ceiling = recorded
    path = str(tmp_path / "calibrated.json")
    entries = calibrate.calibrate(ceiling, FIXTURE, path)
    for cls, value in doc["true_efficiencies"].items():
        assert entries[cls].value == pytest.approx(value, rel=0.06), cls
        assert "SYNTHESIZED" in entries[cls].source
    assert entries[efficiency.LAUNCH_GRAPH].value == pytest.approx(doc["true_gap_s"], rel=0.01)
    # written where the estimate reads it: the table for h100 now carries them, other chips untouched
    table = efficiency.table("h100", calibration_path=path)
    assert table[efficiency.GEMM].value == entries[efficiency.GEMM].value
    assert efficiency.table("h200", calibration_path=path) == efficiency.EFFICIENCY["h200"]
    # the expected time with the calibrated table reproduces the profiled step (kernels shorter than 1.5 us and
    # the +-5% pattern are what it cannot see)
    expected = sum(efficiency.expected_kernel_s(k, table, graph=True) * k.runs for k in ceiling)
    assert expected == pytest.approx(doc["step_s"], rel=0.1)
    published = sum(efficiency.expected_kernel_s(k, efficiency.EFFICIENCY["h100"], graph=True) * k.runs
                    for k in ceiling)
    assert abs(expected - doc["step_s"]) < abs(published - doc["step_s"])


def test_a_second_chip_is_merged_not_overwritten(recorded, tmp_path):
    _, ceiling = recorded
    path = str(tmp_path / "calibrated.json")
    calibrate.calibrate(ceiling, FIXTURE, path)
    calibrate.write("v5e", {efficiency.GEMM: efficiency.Entry(0.5, "x", "")}, path)
    with open(path) as f:
        doc = json.load(f)
    assert set(doc) == {"h100", "v5e"} and efficiency.LAUNCH_GRAPH in doc["h100"]


@pytest.mark.parametrize("patch, message", [({"chip": "h900"}, "chip 'h900' is unknown"),
                                            ({"kernels": {}}, "no kernels"),
                                            ({"kernels": {"a": 0}}, "time 0")])
def test_bad_profiles_are_refused_with_one_line_and_nothing_written(recorded, tmp_path, patch, message):
    doc, ceiling = recorded
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**doc, **patch}))
    out = tmp_path / "calibrated.json"
    with pytest.raises(calibrate.ProfileError, match=message) as e:
        calibrate.calibrate(ceiling, str(bad), str(out))
    assert "\n" not in str(e.value) and not out.exists()


def test_a_profile_of_another_program_is_refused(recorded, tmp_path):
    doc, ceiling = recorded
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "kernels": {"no_such_kernel": 1e-5}}))
    with pytest.raises(calibrate.ProfileError, match="none of its 1 kernels"):
        calibrate.calibrate(ceiling, str(other), str(tmp_path / "c.json"))
