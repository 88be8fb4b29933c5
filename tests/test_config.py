import pytest

from tidar_jax.config import ConfigError, ModelConfig
from jax.sharding import PartitionSpec as P

from tidar_jax.sharding import logical_to_spec, make_mesh


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=3), "num_heads"),               # does not divide hidden 128
    (dict(num_kv_heads=3), "num_kv_heads"),         # does not divide heads 4
    (dict(block_size=0), "block_size"),
    (dict(mask_token_id=512), "mask_token_id"),
    (dict(mask_token_id=-1), "mask_token_id"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(family="gpt2"), "family"),
    (dict(num_layers=1.5), "num_layers"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"model\.{field}="):
        ModelConfig(**changes)


def test_head_dim_default_and_explicit():
    assert ModelConfig(hidden_size=128, num_heads=4).head_dim == 32
    cfg = ModelConfig(hidden_size=128, num_heads=3, num_kv_heads=1, head_dim=64)  # Qwen3 style explicit head_dim
    assert cfg.head_dim == 64


def test_roundtrip_dict_and_unknown_key():
    cfg = ModelConfig(qk_norm=True, family="qwen3")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"hidden": 3})


def test_frozen():
    with pytest.raises(Exception):
        ModelConfig().vocab_size = 3


def test_rules_drop_non_dividing_axes():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 8), mesh) == P("fsdp", None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("bogus",))


def test_mesh_size_must_match_devices():
    with pytest.raises(ValueError, match="must equal the device count"):
        make_mesh(2, 2, 1)
