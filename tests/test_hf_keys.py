"""The key table and config mapping as properties: both directions are exact inverses, layouts agree with an
element-by-element reference, config.json maps both ways losslessly, shard plans are bounded and ordered."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidar_jax.config import ModelConfig
from tidar_jax.hf import HFFormatError, bound_keys, hf_config_to_model_config, model_config_to_hf_config
from tidar_jax.hf.export import plan_shards

FAMILY_FLAGS = {"qwen2": dict(qkv_bias=True, qk_norm=False), "qwen3": dict(qkv_bias=False, qk_norm=True),
                "llama": dict(qkv_bias=False, qk_norm=False)}


@st.composite
def configs(draw):
    family = draw(st.sampled_from(sorted(FAMILY_FLAGS)))
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 4))
    hidden = heads * head_dim if family == "qwen2" else draw(st.integers(2, 24))
    vocab = draw(st.integers(4, 40))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))  # HF records one dtype for params and compute
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=draw(st.integers(1, 3)), num_heads=heads,
                       num_kv_heads=kv, head_dim=head_dim, mlp_size=draw(st.integers(1, 20)),
                       rope_theta=draw(st.sampled_from([10000.0, 1e6, 123.5])),
                       rms_eps=draw(st.sampled_from([1e-6, 1e-5])), tie_embeddings=draw(st.booleans()),
                       dtype=dtype, param_dtype=dtype, mask_token_id=vocab - 1,
                       block_size=draw(st.integers(1, 16)), family=family, **FAMILY_FLAGS[family])


@settings(max_examples=40, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2 ** 31 - 1))
def test_directions_are_exact_inverses(cfg, seed):
    rng = np.random.default_rng(seed)
    keys = list(bound_keys(cfg))
    assert len({k.hf_name for k in keys}) == len(keys) and len({k.our_path for k in keys}) == len(keys)
    for k in keys:
        hf = rng.standard_normal(k.hf_shape).astype(np.float32)
        ours = k.to_ours(hf)
        assert ours.shape == k.our_shape
        assert np.array_equal(k.to_hf(ours), hf)
        assert np.prod(k.hf_shape) == np.prod(k.our_shape)
    # parameter count implied by the table equals the config's own count
    assert sum(int(np.prod(k.our_shape)) for k in keys) == cfg.num_params


def test_layouts_match_elementwise_reference():
    """torch Linear W[out, in], y = x @ W.T; our q_proj[d, h, k] must be W[h*hd + k, d], o_proj[h, k, d] must be
    W[d, h*hd + k], MLP weights plain transposes. Checked index by index, not by reshape."""
    cfg = ModelConfig(vocab_size=7, hidden_size=6, num_layers=1, num_heads=3, num_kv_heads=1, head_dim=4,
                      mlp_size=5, mask_token_id=1, family="qwen3", qk_norm=True, tie_embeddings=False)
    keys = {k.hf_name.split(".", 3)[-1] if k.rule.per_layer else k.hf_name: k for k in bound_keys(cfg)}
    rng = np.random.default_rng(0)
    q = keys["self_attn.q_proj.weight"]
    w = rng.standard_normal(q.hf_shape)
    ours = q.to_ours(w)
    for d in range(6):
        for h in range(3):
            for kk in range(4):
                assert ours[d, h, kk] == w[h * 4 + kk, d]
    o = keys["self_attn.o_proj.weight"]
    w = rng.standard_normal(o.hf_shape)
    ours = o.to_ours(w)
    for d in range(6):
        for h in range(3):
            for kk in range(4):
                assert ours[h, kk, d] == w[d, h * 4 + kk]
    for name in ("mlp.gate_proj.weight", "mlp.down_proj.weight", "lm_head.weight"):
        w = rng.standard_normal(keys[name].hf_shape)
        assert np.array_equal(keys[name].to_ours(w), w.T)
    x = rng.standard_normal(keys["model.embed_tokens.weight"].hf_shape)
    assert np.array_equal(keys["model.embed_tokens.weight"].to_ours(x), x)


@settings(max_examples=40, deadline=None)
@given(cfg=configs())
def test_config_round_trip(cfg):
    hf = model_config_to_hf_config(cfg)
    assert hf["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                    "llama": "LlamaForCausalLM"}[cfg.family]]
    assert hf_config_to_model_config(hf) == cfg


def test_exported_config_is_understood_by_transformers():
    from transformers import AutoConfig

    for family in FAMILY_FLAGS:
        cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                          mlp_size=24, rope_theta=5e5, mask_token_id=7, block_size=8, family=family,
                          **FAMILY_FLAGS[family])
        hf = dict(model_config_to_hf_config(cfg))
        model_type = hf.pop("model_type")
        loaded = AutoConfig.for_model(model_type, **hf)
        assert (loaded.hidden_size, loaded.num_key_value_heads, loaded.intermediate_size) == (16, 2, 24)
        assert loaded.rope_parameters["rope_theta"] == 5e5
        assert getattr(loaded, "head_dim", 4) == 4
        assert (loaded.mask_token_id, loaded.block_size) == (7, 8)  # TiDAR fields kept on the config


def test_transformers_v4_layout_is_read():
    """Released checkpoints (e.g. Qwen2.5) use top-level rope_theta and torch_dtype."""
    v4 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "num_attention_heads": 12,
          "num_key_value_heads": 2, "num_hidden_layers": 28, "intermediate_size": 8960, "vocab_size": 151936,
          "rope_theta": 1000000.0, "rope_scaling": None, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
          "rms_norm_eps": 1e-6, "use_sliding_window": False, "hidden_act": "silu"}
    cfg = hf_config_to_model_config(v4)
    assert (cfg.rope_theta, cfg.param_dtype, cfg.head_dim, cfg.mask_token_id, cfg.family, cfg.qkv_bias) == \
        (1e6, "bfloat16", 128, 151662, "qwen2", True)
    with pytest.raises(HFFormatError, match="rope_type='llama3'"):
        hf_config_to_model_config({**v4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=30), limit=st.integers(1, 120))
def test_shard_plan_bounded_and_ordered(sizes, limit):
    class Key:  # only the shape matters to the planner
        def __init__(self, n):
            self.hf_shape = (n,)

    keys = [Key(n) for n in sizes]
    shards = plan_shards(keys, 1, limit)
    assert [k for s in shards for k in s] == keys
    for s in shards:
        assert s and (sum(k.hf_shape[0] for k in s) <= limit or len(s) == 1)
    for a, b in zip(shards, shards[1:]):  # greedy: the next tensor really did not fit
        assert sum(k.hf_shape[0] for k in a) + b[0].hf_shape[0] > limit
