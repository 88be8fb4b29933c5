"""The decode benchmark runs end to end at a tiny size and writes its JSON and Markdown results."""

from __future__ import annotations

import json

from benchmarks import decode_speed


def test_decode_speed_smoke(tmp_path):
    decode_speed.main(["--block-sizes", "2", "--batch-sizes", "2", "--rounds", "1", "--max-new-tokens", "6",
                       "--prompt-len", "5", "--vocab", "64", "--hidden", "32", "--layers", "1",
                       "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "decode_speed.json").read_text())
    assert "RANDOM model" in data["model"] and data["machine"]["cpu_threads"]
    names = {r["config"] for r in data["results"]}
    assert names == {"AR N=2", "TiDAR B=2 N=2"}
    tidar = next(r for r in data["results"] if r["config"] == "TiDAR B=2 N=2")
    assert tidar["tokens"] == 12 and tidar["tokens_per_s"] > 0
    assert "| TiDAR B=2 N=2 |" in (tmp_path / "decode_speed.md").read_text()
