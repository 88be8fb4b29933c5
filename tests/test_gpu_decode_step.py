"""The accelerator section that measures the decode step (benchmarks/gpu_decode_step.py) runs end to end on CPU
with a tiny model: every case is timed, the AR step is the ratio's unit, and no estimate is claimed for a device
the cost model does not know."""

import json

from benchmarks import gpu_decode_step


def test_gpu_decode_step_runs_on_tiny_shapes(tmp_path):
    result = gpu_decode_step.main(["--presets", "tiny", "--block-sizes", "4", "--batches", "1", "--contexts", "16", "--rounds", "1",
                                   "--out", str(tmp_path)])
    cases = result["cases"]
    assert [(c["mode"], c["block_size"]) for c in cases] == [("ar", 1), ("tidar", 4)]
    assert all(c["measured_s"] > 0 for c in cases)
    assert next(c for c in cases if c["mode"] == "ar")["over_ar_step"] == 1.0
    assert all(c["estimate_s"] is None for c in cases)  # a CPU is no chip of the cost model
    assert json.loads((tmp_path / "gpu_decode_step.json").read_text())["cases"] == json.loads(json.dumps(cases))
