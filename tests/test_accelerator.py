"""The accelerator evidence suite (benchmarks/accelerator/).

* ``--smoke`` runs every section end to end on CPU with grain made unimportable (the accelerator image has no
  grain), writes every documented field, and greedy lossless TiDAR equals our AR decode row for row;
* the figures it computes (projected speedup, roofline bytes, model FLOPs and MFU) equal independent
  calculations, and the figures in the smoke JSON are consistent with the raw timings next to them;
* a budget too small for a section records it as skipped with the reason.
Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import accelerator as acc  # noqa: E402
from cli_output import user_lines

# The documented schema (docs/benchmarks.md, "Accelerator evidence suite"): every key must be present in --smoke.
TOP_FIELDS = ["schema_version", "suite", "smoke", "command", "argv", "budget_s", "elapsed_s", "machine", "sizes",
              "sections", "plots"]
MACHINE_FIELDS = ["backend", "device_kind", "device_count", "jax_version", "jaxlib_version", "peak_bf16_flops_per_s",
                  "peak_flops_source", "memory"]
SECTION_COMMON = ["status", "reason", "elapsed_s", "process_cpu_s", "allowance_s", "command"]
SECTION_FIELDS = {
    "trained_speedup": ["training", "decode", "all_outputs_identical", "best"],
    "free_slots": ["models", "projections", "queries", "blocks", "contexts", "batches", "statistic", "dtype",
                   "attention_kernel", "note"],
    "roofline": ["bandwidth", "ar_step", "ar_loop", "skipped", "note"],
    "train_throughput": ["model", "model_config", "seq_len", "global_batch", "remat", "layers_timed", "kernels",
                         "kernel_detection", "device_kind", "peak_flops_per_s", "peak_flops_source",
                         "measured_matmul", "memory_before", "memory_note", "flops_note"],
    "attention_kernels": ["device", "chip", "estimates_are", "rows"],
    "decode_step": ["dtype", "cases", "skipped", "estimates_are"],
    "calibration": ["measured", "calibrated_path", "profile", "entries"],
}
TRAINING_FIELDS = ["num_params", "seq_len", "batch", "block_size", "steps", "wall_s", "tokens_seen",
                   "train_tokens_per_s", "epochs_over_train_split", "heldout", "train_windows",
                   "heldout_minus_train_ar_loss", "overfits", "loss_curve", "heldout_curve"]
DECODE_ROW_FIELDS = ["mode", "block_size", "batch", "tokens", "wall_s_min", "tokens_per_s", "nfe", "tokens_per_nfe",
                     "speedup_vs_ar", "outputs_identical_to_ar", "rows_identical_to_ar", "compile_s"]
LATENCY_FIELDS = ["kind", "batch", "context", "query_tokens", "block_size", "head_rows", "min_ms", "median_ms",
                  "rounds", "vs_q1"]
PROJECTION_FIELDS = ["model", "paper_model", "batch", "context", "block_size", "paper_tokens_per_nfe", "ar_step_ms",
                     "tidar_step_ms", "step_cost_ratio", "projected_speedup", "paper_speedup"]
ROOFLINE_FIELDS = ["model", "context", "weight_bytes", "kv_bytes", "bytes_per_step", "bound_ms", "ar_step_ms",
                   "tokens_per_s", "bound_tokens_per_s", "fraction_of_roofline"]
KERNEL_FIELDS = ["status", "reason", "grad_accum", "micro_batch", "objectives", "compile_s", "peak_memory",
                 "tidar_over_ar_step", "tidar_over_ar_step_full"]
DEPTH_FIELDS = ["layers", "step_s", "tokens_per_s", "model_flops", "mfu", "mfu_vs_measured_matmul",
                "compiled_memory", "rounds"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's run
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel")
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("def add(a, b):\n    return a + b\n---\nimport os\nprint(os.getcwd())\n")
    # grain is made unimportable: the suite's whole path must run on the accelerator image, which has none
    code = ("import sys, runpy; sys.modules['grain'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code, "benchmarks.accelerator", "--smoke", "--out",
                           str(out), "--prompt-file", str(prompt_file)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "accelerator.json").read_text())


def test_smoke_every_section_runs_and_every_field_is_there(smoke):
    out, res = smoke
    for key in TOP_FIELDS:
        assert key in res, key
    for key in MACHINE_FIELDS:
        assert key in res["machine"], key
    assert res["machine"]["backend"] == "cpu" and res["machine"]["peak_bf16_flops_per_s"] is None
    for name, fields in SECTION_FIELDS.items():
        sec = res["sections"][name]
        assert sec["status"] == "ok", (name, sec["reason"])
        for key in SECTION_COMMON + fields:
            assert key in sec, (name, key)
        assert f"--sections {name}" in sec["command"]
    s1 = res["sections"]["trained_speedup"]
    for key in TRAINING_FIELDS:
        assert key in s1["training"], key
    assert s1["training"]["steps"] >= 1 and s1["training"]["heldout"]["ar_loss"] > 0
    assert "diff_loss" in s1["training"]["heldout"]
    rows = s1["decode"]["rows"]
    assert {(r["mode"], r["batch"], r["block_size"]) for r in rows} == {("ar", 2, None), ("tidar", 2, 4)}
    for r in rows:
        for key in DECODE_ROW_FIELDS:
            assert key in r, key
        assert 1.0 <= r["tokens_per_nfe"] <= (r["block_size"] or 1)
    assert s1["decode"]["prompts"]["from_file"] == 2
    s2 = res["sections"]["free_slots"]
    assert set(s2["models"]) == set(acc.QWEN_SHAPES)
    for m in s2["models"].values():
        assert m["latency"] and not m["skipped"]
        for r in m["latency"]:
            for key in LATENCY_FIELDS:
                assert key in r, key
    assert {p["model"] for p in s2["projections"]} == set(acc.PAPER)
    for p in s2["projections"]:
        for key in PROJECTION_FIELDS:
            assert key in p, key
    s3 = res["sections"]["roofline"]
    assert len(s3["ar_step"]) == len(acc.QWEN_SHAPES) and len(s3["ar_loop"]) == acc.SMOKE.loop_models
    for r in s3["ar_step"]:
        for key in ROOFLINE_FIELDS:
            assert key in r, key
    s4 = res["sections"]["train_throughput"]
    assert s4["kernels"]["reference"]["status"] == "ok"
    assert set(s4["kernels"]) == set(acc.ATTENTION_KERNELS)
    for name, k in s4["kernels"].items():
        if k["status"] != "ok":
            assert k["reason"], name
            continue
        for key in KERNEL_FIELDS:
            assert key in k, key
        assert k["peak_memory"] is None  # CPU: memory_stats() gives nothing, recorded as None
        for obj in ("tidar", "ar"):
            for r in k["objectives"][obj]["by_depth"]:
                for key in DEPTH_FIELDS:
                    assert key in r, key
                assert r["mfu"] is None  # no datasheet peak for a CPU
    s5 = res["sections"]["attention_kernels"]
    assert {r["kernel"] for r in s5["rows"]} == {"blockwise", "reference"}
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_estimate_s"] is None for r in s5["rows"])
    s6 = res["sections"]["decode_step"]
    assert [(c["mode"], c["block_size"]) for c in s6["cases"]] == [("ar", 1), ("tidar", 4)] and not s6["skipped"]
    assert all(c["measured_s"] > 0 and c["estimate_s"] is None for c in s6["cases"])  # a CPU is no listed chip
    s7 = res["sections"]["calibration"]  # a CPU is no listed chip: the path runs from the recorded fixture
    assert s7["measured"] is False and os.path.exists(s7["calibrated_path"]) and os.path.exists(s7["profile"])
    from tidar_jax.analysis import efficiency

    table = efficiency.table("h100", calibration_path=s7["calibrated_path"])  # the estimate reads what it wrote
    for cls, entry in s7["entries"].items():
        assert "SYNTHESIZED" in entry["source"] and table[cls].value == pytest.approx(entry["value"])
    plotted = {"trained_speedup", "free_slots", "roofline", "train_throughput"}  # the timing tables have no plot
    assert {p["section"] for p in res["plots"]} == plotted
    for p in res["plots"]:
        with open(out / p["path"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "accelerator.md").read_text()
    assert all(f"## {name}: ok" in md for name in acc.SECTIONS)


def test_smoke_lossless_tidar_equals_ar(smoke):
    _, res = smoke
    s1 = res["sections"]["trained_speedup"]
    tidar = [r for r in s1["decode"]["rows"] if r["mode"] == "tidar"]
    assert tidar and s1["all_outputs_identical"] is True
    for r in tidar:
        assert r["outputs_identical_to_ar"] is True and r["rows_identical_to_ar"] == r["batch"]
        assert r["speedup_vs_ar"] > 0


def test_smoke_figures_agree_with_their_inputs(smoke):
    """Every derived figure recomputed here from the raw numbers beside it in the JSON."""
    _, res = smoke
    s2 = res["sections"]["free_slots"]
    for p in s2["projections"]:
        lat = s2["models"][p["model"]]["latency"]
        ar_kind = "ar_step"  # the engine's AR step forward
        ar = next(r["min_ms"] for r in lat if r["kind"] == ar_kind and r["query_tokens"] == 1
                  and r["batch"] == p["batch"] and r["context"] == p["context"])
        step = next(r["min_ms"] for r in lat if r["kind"] == "tidar_step" and r["block_size"] == 16
                    and r["batch"] == p["batch"] and r["context"] == p["context"])
        assert p["projected_speedup"] == pytest.approx(acc.PAPER[p["model"]]["tokens_per_nfe"] * ar / step)
    s3 = res["sections"]["roofline"]
    gbs = s3["bandwidth"]["copy_gb_s"]
    for r in s3["ar_step"]:
        assert r["bound_ms"] == pytest.approx((r["weight_bytes"] + r["kv_bytes"]) / (gbs * 1e9) * 1e3)
        assert r["fraction_of_roofline"] == pytest.approx(r["bound_ms"] / r["ar_step_ms"])
    s4 = res["sections"]["train_throughput"]
    measured = s4["measured_matmul"]["flops_per_s"]
    for k in s4["kernels"].values():
        if k["status"] != "ok":
            continue
        for r in k["objectives"]["tidar"]["by_depth"]:
            assert r["mfu_vs_measured_matmul"] == pytest.approx(r["model_flops"] / r["step_s"] / measured)
            assert r["tokens_per_s"] == pytest.approx(s4["global_batch"] * s4["seq_len"] / r["step_s"])


# ------------------------------------------------------------------------------------------------------------
# Logic: the formulas against independent calculations
# ------------------------------------------------------------------------------------------------------------

def test_calibration_reads_device_kernels_from_a_trace():
    """The calibration section's trace reading: complete events on device processes only, mean per launch."""
    from benchmarks.accelerator.calibration import kernel_times

    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion_2", "dur": 3.0},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion_2", "dur": 5.0},
        {"ph": "X", "pid": 2, "name": "loop_add_fusion_2", "dur": 100.0},
        {"ph": "X", "pid": 1, "name": "gemm_fusion", "dur": 10.0}]}
    assert kernel_times(trace) == pytest.approx({"loop_add_fusion_2": 4e-6, "gemm_fusion": 10e-6})


def test_projected_speedup_matches_hand_calculation():
    # paper T/NFE 7.45; a TiDAR step costing 1.5x an AR step gives 7.45 / 1.5 tokens per AR-step time
    assert acc.projected_speedup(7.45, 2.0e-3, 3.0e-3) == pytest.approx(7.45 / 1.5)
    assert acc.projected_speedup(8.25, 1.0, 1.0) == pytest.approx(8.25)


@pytest.mark.parametrize("tie,qk_norm", [(True, False), (False, True)])
def test_train_step_flops_from_the_real_parameter_shapes(tie, qk_norm):
    from tidar_jax.config import ModelConfig
    from tidar_jax.train.flops import model_flops
    from tidar_jax.masks import training_mask
    from tidar_jax.model.functional import abstract_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_size=48, tie_embeddings=tie, qk_norm=qk_norm, qkv_bias=True, block_size=4,
                      mask_token_id=1)
    _, abstract = abstract_model(cfg)
    from flax import nnx

    import jax

    pure = nnx.to_pure_dict(abstract)
    # matmul weights of all layers: every array but the norm scales and the q/k/v biases
    layer_weights = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(pure["layers"])
                        if not any(getattr(k, "key", None) in ("scale", "q_bias", "k_bias", "v_bias") for k in path))
    seq, batch = 16, 3
    for objective, tokens, pairs in (("tidar", 2 * seq, int(np.asarray(training_mask(seq, 4)).sum())),
                                     ("ar", seq, seq * (seq + 1) // 2)):
        forward = (2 * batch * tokens * (layer_weights + cfg.hidden_size * cfg.vocab_size)
                   + 2 * 2 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs)
        assert model_flops(cfg, batch, seq, objective) == 3 * forward  # the library's count the suite uses


def test_mfu_and_peak_table():
    assert acc.mfu(989.4e12 * 0.5, 1.0, 989.4e12) == pytest.approx(0.5)
    assert acc.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert acc.mfu(1e12, 1.0, None) is None
    assert acc.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert acc.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert acc.peak_flops("NVIDIA H200") == 989.4e12
    assert acc.peak_flops("TPU v5 lite") == 197e12 and acc.peak_flops("TPU v5") == 459e12
    assert acc.peak_flops("cpu") is None and acc.peak_flops(None) is None


@pytest.mark.parametrize("tie", [True, False])
def test_roofline_bytes_match_the_real_parameter_arrays(tie):
    """weight/KV bytes against the bytes of the model's actual arrays (an untied embedding table contributes only
    the looked-up row) and of a real cache."""
    import jax
    from flax import nnx

    from benchmarks import common as bc
    from tidar_jax.config import ModelConfig
    from tidar_jax.model import KVCache
    from tidar_jax.model.functional import abstract_model

    cfg = ModelConfig(**{**bc.PRESETS["tiny"], "tie_embeddings": tie, "dtype": "bfloat16",
                         "param_dtype": "bfloat16"})
    _, abstract = abstract_model(cfg)  # shapes and dtypes of the real parameter arrays, nothing allocated
    pure = nnx.to_pure_dict(abstract)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pure))
    embed = pure["embed"]
    weights = total if tie else total - embed.size * embed.dtype.itemsize + embed.shape[1] * embed.dtype.itemsize
    assert acc.weight_bytes_per_token(cfg, 2) == weights
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, 1, 24))
    assert acc.kv_bytes(cfg, 24, 2) == sum(x.size * x.dtype.itemsize for x in (cache.k_LNCKD, cache.v_LNCKD))


def test_depth_extrapolation_is_exact_on_linear_data():
    fixed, per_layer = 0.3, 0.05
    ext = acc.extrapolate_depth({1: fixed + per_layer, 2: fixed + 2 * per_layer}, 28)
    assert ext["per_layer_s"] == pytest.approx(per_layer) and ext["fixed_s"] == pytest.approx(fixed)
    assert ext["full_depth_s"] == pytest.approx(fixed + 28 * per_layer) and ext["extrapolated"]
    assert acc.extrapolate_depth({28: 1.5}, 28) == {"per_layer_s": None, "fixed_s": None, "full_depth_s": 1.5,
                                                    "extrapolated": False}


def test_section_allowances_spend_the_budget():
    order = acc.SECTIONS
    first = acc.section_allowance(100.0, order[0], order)
    assert first == pytest.approx(100.0 * acc.SHARES[order[0]])
    assert acc.section_allowance(100.0, order[-1], order) == pytest.approx(100.0)  # the last one gets what is left


def test_tiny_budget_records_sections_as_skipped(tmp_path):
    res = acc.main(["--smoke", "--budget-s", "1", "--sections", "roofline,train_throughput", "--out",
                    str(tmp_path)])
    for name in ("roofline", "train_throughput"):
        assert res["sections"][name]["status"] == "skipped" and "budget" in res["sections"][name]["reason"]
    assert res["sections"]["free_slots"]["status"] == "not_run"
    on_disk = json.loads((tmp_path / "accelerator.json").read_text())
    assert set(on_disk["sections"]) == set(acc.SECTIONS)


def test_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--smoke", "--out", str(tmp_path),
                           "--sections", "bogus"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = user_lines(proc.stderr)
    assert len(err) == 1 and "--sections='bogus'" in err[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "accelerator.json").exists()


@pytest.mark.parametrize("args,needle", [(["--budget-s", "0"], "--budget-s=0"),
                                         (["--prompt-file", "/nonexistent"], "--prompt-file=/nonexistent"),
                                         (["--data", "/nonexistent"], "--data=/nonexistent")])
def test_bad_values_are_named(args, needle, tmp_path):
    with pytest.raises(SystemExit) as e:
        acc.parse_args(["--smoke", "--out", str(tmp_path), *args])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # about 1 min on the loaded 2-core machine; the scripts' own smokes are in the default suite
def test_cpu_section_runs_its_script_and_records_its_result(tmp_path):
    """A CPU section runs the script in this process at its tiniest size; its own JSON lands in --out, and the
    suite records the file and the command that reproduces it alone."""
    res = acc.main(["--smoke", "--sections", "cpu_decode_modes", "--out", str(tmp_path)])
    sec = res["sections"]["cpu_decode_modes"]
    assert sec["status"] == "ok", sec["reason"]
    assert sec["script_command"].startswith("python -m benchmarks.decode_modes --out ") and "--tiny" in sec[
        "script_command"]
    rows = json.loads((tmp_path / sec["result_file"]).read_text())["rows"]
    assert all(r["equal_to_ar"] for r in rows if r["mode"] in ("ar", "lossless"))
    assert res["sections"]["trained_speedup"]["status"] == "not_run" and "cpu_free_slots" not in res["sections"]
