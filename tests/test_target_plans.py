"""Plans compiled for a GPU (H100) and a TPU (v5e) target on this CPU, at small shapes: the real train step (splash
on a multi-chip TPU mesh), prefill and one decode step; properties of the compiled programs (memory within the
stated bounds, kernel counts and loops reported, the cost model's estimate carried with its assumptions). Bad
input through train.py / decode.py: one line and a non-zero exit. The compile tests need the optional installs
(requirements-gpu-compile.txt, requirements-tpu-compile.txt; CI has them) and skip with the reason elsewhere.

Properties of the kernels themselves (no data-dependent loop in a decode step, no loop over attention tiles in the
train step) are asserted by the kernel work that provides them, not here."""

import json

import pytest

from tidar_jax import targets
from tidar_jax.targets import parse_target

TINY_OVERRIDES = ["model.num_layers=1", "data.seq_len=64", "model.mask_token_id=1"]


def _need(name):
    reason = targets.missing_install(parse_target(name))
    if reason:
        pytest.skip(reason)
    return parse_target(name)


@pytest.mark.parametrize("name", ["h100x8", "v5e-4"])
def test_train_step_compiles_for_the_target(name):
    from tidar_jax.attention import resolve
    from tidar_jax.train.config import load_config
    from tidar_jax.analysis.train_plan import run_plan

    target = _need(name)
    attention = resolve("auto", target.platform)  # TPU: splash on the multi-chip mesh
    cfg = load_config("configs/tiny.yaml", TINY_OVERRIDES)
    result = run_plan(cfg, target=target)
    assert result["config"]["attention"] == attention  # auto chose the target platform's kernel
    assert result["target"]["chips"] == target.count
    assert result["target"]["device_kind"] == target.chip.description
    p, a, e = result["per_device"], result["analytic_per_device"], result["estimate"]
    # the stated bound: XLA's per-device total within 1.5x the analytic breakdown, and far inside the chip
    assert 0 < p["total_bytes"] <= 1.5 * a["total_bytes"] + 2 ** 20
    assert p["total_bytes"] < target.chip.hbm_bytes
    # the step at two levels, MFU and the attention kernels' share at each; on a TPU too (trip counts from the
    # unoptimised HLO)
    for level in ("ceiling", "expected"):
        assert 0 < e[f"mfu_{level}"] < 1 and 0 <= e[f"attention_share_{level}"] < 1
    assert 0 < e["ceiling_s"] <= e["expected_s"] and e["mfu_expected"] <= e["mfu_ceiling"]
    assert e["launches"] > 0 and e["launches_per_micro_batch"] == e["launches"] / cfg.optim.grad_accum
    assert e["flops_per_device"] > 0
    if target.platform == "tpu":
        from tidar_jax.analysis.train_plan import format_plan

        assert "loops run on the device" in e["assumptions_line"] and "expected" in format_plan(result)
    assert target.chip.name in e["assumptions_line"] and "launch" in e["assumptions_line"]


@pytest.mark.parametrize("name", ["h100", "v5e-4"])
def test_prefill_and_decode_step_compile_for_the_target(name):
    from tidar_jax.config import ModelConfig
    from tidar_jax.analysis.decode_plan import compile_decode, decode_estimates, plan_summary

    target = _need(name)
    # head_dim 128 as on the real models: XLA:TPU pads a smaller minor dimension to 128 lanes
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128,
                      mlp_size=256, dtype="bfloat16", param_dtype="bfloat16", mask_token_id=1, block_size=4)
    batch, block, context, page = 2, 4, 256, 128
    from tidar_jax.analysis import xla_cost

    programs = compile_decode(cfg, targets.target_devices(target), batch=batch, block_size=block, context=context,
                              max_new_tokens=32, cache_page=page, modes=("tidar",),
                              step_compiler_options=xla_cost.compile_options() if target.platform == "gpu" else None)
    summary = plan_summary(cfg, programs, target=target.name, batch=batch, block_size=block, context=context,
                           cache_page=page)
    assert summary["device_kind"] == target.chip.description
    step = summary["programs"]["tidar step"]
    assert step["entry_kernels"] > 0 and step["launches"] >= step["entry_kernels"]
    assert step["launches_per_layer"] == step["launches"] / cfg.num_layers
    assert step["assumed_dynamic_trips"] == context // page
    # the stated bound: the weights, the cache (donated: aliased, not doubled) and temporaries of at most two more
    # copies of the cache (what XLA:GPU and XLA:TPU keep today around the step's K/V scatter; docs/decode.md)
    cache_slots = context + 32 + block
    weights = cfg.num_params * 2
    cache = 2 * cfg.num_layers * batch * cache_slots * cfg.num_kv_heads * cfg.head_dim * 2
    assert step["memory"]["total_bytes"] <= weights + 3 * cache + 2 ** 20
    assert step["memory"]["alias_bytes"] >= cache  # the donated state is updated in place
    est = decode_estimates(programs, target.chip, batch, context=context)
    _assert_two_levels(est, target.platform)
    json.dumps(summary)  # --json serialises it
    json.dumps(est)
    if target.platform == "tpu":  # a TPU's loops run on the device: no host round trips anywhere in its plan
        assert "host_round_trips" not in json.dumps(summary) + json.dumps(est)


def _assert_two_levels(est, platform):
    """Every compiled program carries ``ceiling_s`` and ``expected_s`` (expected never below the ceiling), a GPU
    target XLA's own figure for its steps, a TPU target the loops' trip counts the times charged (the TPU step
    with ``auto``'s Mosaic cache kernel has none; ``tests/test_tpu_time.py`` checks counted loops)."""
    variants = ["programs"] if platform == "tpu" else ["programs", "graph"]
    assert [k for k in ("programs", "graph") if k in est] == variants
    for variant in variants:
        for name, p in est[variant].items():
            assert 0 < p["ceiling_s"] <= p["expected_s"], (variant, name)
            if name.endswith("step") and platform == "gpu":
                assert p["xla_s"] > 0 and p["xla_covered_kernels"] > 0
                assert p["outer_loop_round_trip_s"] > 0  # the generation loop's predicate, once per step
            if name.endswith("step") and platform == "tpu":  # the trip counts charged (none: the Mosaic cache
                assert "loops" in p and all(lp["assumed"] >= 1 for lp in p["loops"])  # kernel has no loop)


def test_decode_plan_json_carries_both_levels_and_xla_on_gpu(tmp_path, capsys):
    """``decode.py --plan --estimate --json`` on a small model: each step's ``ceiling_s`` / ``expected_s`` pair, the
    projected speedup at both levels, and XLA's figure (the CLI compiles the steps with its cost model on)."""
    import decode

    _need("h100")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "mask_token_id": 1}))
    assert decode.main(["--plan", "--target", "h100", "--hf-config", str(config), "--context", "128",
                        "--block-size", "4", "--max-new-tokens", "16", "--estimate", "--tokens-per-nfe", "3",
                        "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    _assert_two_levels(est, "gpu")
    for ratios in (est["ratios"], est["graph_ratios"]):
        assert ratios["projected_speedup_ceiling"] > 0 and ratios["projected_speedup_expected"] > 0
    assert any("xla" in key for key in est["graph"]["ar step"])


def _main_exit(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return str(e.value.code)


@pytest.mark.parametrize("tool", ["train", "decode"])
@pytest.mark.parametrize("target, fragment", [("h100x3", "3 GPUs cannot form a mesh"), ("z900", "unknown target"),
                                              ("v5p-2", "no deviceless v5p topology")])
def test_bad_target_is_one_line_and_nonzero(tool, target, fragment):
    import decode
    import train

    argv = (["--config", "configs/tiny.yaml", "--plan", "--target", target] if tool == "train" else
            ["--plan", "--target", target, "--preset", "qwen2.5-1.5b"])
    msg = _main_exit(train if tool == "train" else decode, argv)
    assert fragment in msg and "\n" not in msg and "allowed" in msg


@pytest.mark.parametrize("tool", ["train", "decode"])
def test_missing_plugin_is_one_line_and_nonzero(tool, monkeypatch):
    import decode
    import train

    monkeypatch.setattr(targets, "_find", lambda module: None)
    argv = (["--config", "configs/tiny.yaml", "--plan", "--target", "h100x8"] if tool == "train" else
            ["--plan", "--target", "h100", "--preset", "qwen2.5-1.5b"])
    msg = _main_exit(train if tool == "train" else decode, argv)
    assert "-r requirements-gpu-compile.txt" in msg and "pip install --no-deps --target " in msg and "\n" not in msg


def test_device_count_the_mesh_cannot_use_is_one_line(monkeypatch):
    import train

    _need("h100x8")
    # 8 GPUs cannot split a global batch of 4 sequences
    msg = _main_exit(train, ["--config", "configs/tiny.yaml", "--plan", "--target", "h100x8", *TINY_OVERRIDES,
                             "data.global_batch=4"])
    assert "global_batch=4" in msg and "\n" not in msg


def test_decode_mesh_larger_than_the_target_is_one_line():
    import decode

    _need("h100x2")
    msg = _main_exit(decode, ["--plan", "--target", "h100x2", "--preset", "qwen2.5-1.5b", "--mesh", "tensor=4"])
    assert "needs 4 devices" in msg and "\n" not in msg


def test_model_shapes_agree_with_the_training_presets():
    from tidar_jax.presets import MODEL_SHAPES
    from tidar_jax.train.config import load_config

    for shape, config in (("qwen2.5-1.5b", "configs/qwen2.5-1.5b-tidar.yaml"),
                          ("qwen3-8b", "configs/qwen3-8b-tidar.yaml")):
        arch = load_config(config).model.arch
        for key, value in MODEL_SHAPES[shape].items():
            assert arch.get(key) == value, (shape, key)
