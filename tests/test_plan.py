"""``train.py --plan`` on the tiny preset against an independent count: parameter and optimizer bytes exactly,
the compiled argument bytes exactly, FLOPs within 10% of 6 x params x tokens + attention."""

import json

import jax.numpy as jnp
import pytest

from tidar_jax.train.config import load_config


@pytest.fixture(scope="module")
def tiny_plan():
    from tidar_jax.analysis.train_plan import run_plan

    cfg = load_config("configs/tiny.yaml", ["model.mask_token_id=4095"])
    return cfg, run_plan(cfg, 8)


def test_plan_bytes_match_an_independent_count(tiny_plan):
    cfg, result = tiny_plan
    from tidar_jax.analysis.train_plan import plan_model_config

    m = plan_model_config(cfg)
    # independent parameter count from the architecture (Qwen2: qkv bias, tied embeddings)
    d, hd, f = m.hidden_size, m.head_dim, m.mlp_size
    attn = d * hd * (2 * m.num_heads + 2 * m.num_kv_heads) + hd * (m.num_heads + 2 * m.num_kv_heads)
    n_params = m.vocab_size * d + m.num_layers * (attn + 3 * d * f + 2 * d) + d
    assert result["config"]["num_params"] == n_params
    # the tiny preset is data-parallel on 8 devices: every device holds all params, Adam mu and nu (float32)
    assert result["config"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    a = result["analytic_per_device"]
    assert a["params_bytes"] == 4 * n_params and a["optimizer_bytes"] == 8 * n_params
    p = result["per_device"]
    scalars = 4 * 3  # train step, Adam count, schedule count (int32 each)
    assert p["state_bytes"] == 12 * n_params + scalars
    # tokens and segment ids (the tiny preset packs documents, the default for a new run)
    batch_bytes = 2 * (cfg.data.global_batch // 8 * cfg.data.seq_len * 4)
    assert p["batch_bytes"] == batch_bytes
    # XLA's compiled arguments are exactly the sharded train state and batch; the state is donated (aliased)
    assert p["argument_bytes"] == 12 * n_params + scalars + batch_bytes
    assert p["alias_bytes"] == 12 * n_params + scalars
    assert p["total_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]


def test_plan_flops_match_6nt_plus_attention(tiny_plan):
    cfg, result = tiny_plan
    m = load_config("configs/tiny.yaml", ["model.mask_token_id=4095"]).model_config()
    tokens = cfg.data.global_batch * 2 * cfg.data.seq_len  # TiDAR doubles the sequence
    t = 2 * cfg.data.seq_len
    matmul_params = m.num_params - m.hidden_size  # layer weights + the (tied) embedding used as the LM head
    attention = 3 * 4 * t * t * m.num_heads * m.head_dim * m.num_layers * cfg.data.global_batch
    expected = (6 * matmul_params * tokens + attention) / 8
    assert result["per_device"]["flops"] == pytest.approx(expected, rel=0.10)


def test_plan_cli_json_and_strict_error(capsys):
    import train

    # an 8-device mesh with tensor=8 cannot shard 4 heads: strict mode names the parameter, dim and mesh axis
    with pytest.raises(SystemExit) as err:
        train._plan(load_config("configs/tiny.yaml", ["model.mask_token_id=4095", "mesh.data=1", "mesh.tensor=8",
                                                     "mesh.strict=true"]), _Args())
    msg = str(err.value)
    assert msg.startswith("error: parameter ") and "not divisible by mesh axis 'tensor' (size 8)" in msg
    assert "\n" not in msg


class _Args:
    plan_devices = 8
    json = True


def test_plan_json_keys(tiny_plan):
    from tidar_jax.analysis.train_plan import json_summary, to_builtin

    doc = json.loads(json.dumps(to_builtin(json_summary(tiny_plan[1]))))
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops"):
        assert doc[key] == doc["per_device"][key]
