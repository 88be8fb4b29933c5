import os

import jax
import numpy as np
import pytest

from tidar_jax.config import ModelConfig
from tidar_jax.checkpoint import CheckpointMeta
from tidar_jax.loading import CheckpointNotFound, load_for_inference
from tidar_jax.model import init_model, split
from tidar_jax.checkpoint.params import load_params, save_params
from tidar_jax.sharding import make_mesh


def _cfg():
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_size=64,
                       mask_token_id=63, qkv_bias=True, family="qwen2", block_size=4)


def test_save_load_roundtrip_single_device_and_mesh(tmp_path):
    cfg = _cfg()
    _, state = split(init_model(cfg, 3))
    path = save_params(str(tmp_path / "ck"), CheckpointMeta(cfg, step=7), state)
    for mesh in (None, make_mesh(2, 2, 2)):
        cfg2, _, restored, meta = load_params(path, mesh=mesh)
        assert cfg2 == cfg and meta.config.block_size == 4 and meta.step == 7
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if mesh is not None:
            q = restored["layers"]["attn"]["q_proj"][...]  # stacked: [layers, embed, heads, head_dim]
            assert q.sharding.spec[1] == "fsdp" and len(q.sharding.device_set) == 8
    bundle = load_for_inference(path)
    assert bundle.config.block_size == 4 and bundle.config == cfg and bundle.step == 7


def test_save_is_atomic_and_refuses_existing(tmp_path):
    cfg = _cfg()
    _, state = split(init_model(cfg, 0))
    path = save_params(str(tmp_path / "ck"), cfg, state)
    with pytest.raises(FileExistsError, match="already exists"):
        save_params(path, cfg, state)
    bad = {"not": "a state"}
    with pytest.raises(Exception):
        save_params(str(tmp_path / "ck2"), cfg, bad, tokenizer_path=str(tmp_path / "missing.json"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # nothing half-written, no temp dirs left


def test_loader_rejects_unknown_paths(tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        load_for_inference(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="not a training run dir"):
        load_for_inference(str(tmp_path / "empty"))
