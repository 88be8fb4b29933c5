"""``ModelConfig.block_size`` is the one record of the trained block size (None: an AR-only model, or a checkpoint
that records none); a decode option left unset means the checkpoint's; one rule picks the [MASK] id."""

import json

import pytest

from test_decode_support import random_tiny
from tidar_jax.config import QWEN_MASK_TOKEN_ID, resolve_mask_token
from tidar_jax.decode import Decoder, DecodeError


def test_unset_block_size_is_the_checkpoints():
    dec = Decoder.from_model(random_tiny("float32", block_size=2), check_block_size=True, max_cache_len=64)
    assert dec.options().block_size == 2
    with pytest.raises(DecodeError, match="trained with block size 2"):
        dec.options(block_size=4)
    assert dec.options(block_size=4, allow_untrained_block_size=True).block_size == 4


def test_no_recorded_block_size_keeps_the_guard_on():
    """An AR-only model (or an HF dir without TiDAR fields) has no trained block size: TiDAR decoding needs an
    explicit, explicitly allowed block size; AR decoding needs nothing."""
    dec = Decoder.from_model(random_tiny("float32", block_size=None), check_block_size=True, max_cache_len=64)
    with pytest.raises(DecodeError, match="records no trained block size"):
        dec.options(mode="tidar")
    with pytest.raises(DecodeError, match="block_size=4: this checkpoint records no trained block size"):
        dec.options(mode="tidar", block_size=4)
    assert dec.options(mode="tidar", block_size=4, allow_untrained_block_size=True).block_size == 4
    assert dec.options(mode="ar").mode == "ar"


def test_mask_token_rule():
    assert resolve_mask_token(3, 7, vocab_size=200_000, qwen=True) == 3  # explicit
    assert resolve_mask_token(None, 7, vocab_size=200_000, qwen=True) == 7  # recorded
    assert resolve_mask_token(None, None, vocab_size=200_000, qwen=True) == QWEN_MASK_TOKEN_ID
    assert resolve_mask_token(None, None, vocab_size=QWEN_MASK_TOKEN_ID, qwen=True) is None  # too small for it
    assert resolve_mask_token(None, None, vocab_size=200_000, qwen=False) is None


def test_metadata_record_round_trip_and_format_1(tmp_path):
    from tidar_jax.checkpoint.metadata import CheckpointMeta, read_meta, write_meta

    cfg = random_tiny("float32", block_size=None).cfg
    write_meta(str(tmp_path), CheckpointMeta(cfg, step=3, eos_token_ids=(5, 6), source="x", hf={"bos_token_id": 1}))
    meta = read_meta(str(tmp_path))
    assert (meta.config, meta.step, meta.eos_token_ids, meta.eos_token_id, meta.source, meta.hf) == \
        (cfg, 3, (5, 6), 5, "x", {"bos_token_id": 1})
    # format 1 params checkpoint: trained_block_size beside the config's block size, null = none recorded
    (tmp_path / "model_config.json").write_text(json.dumps(cfg.replace(block_size=16).to_dict()))
    (tmp_path / "meta.json").write_text(json.dumps({"trained_block_size": None, "eos_token_id": 2}))
    meta = read_meta(str(tmp_path))
    assert (meta.config.block_size, meta.eos_token_ids) == (None, (2,))
    (tmp_path / "meta.json").write_text(json.dumps({"trained_block_size": 8}))
    assert read_meta(str(tmp_path)).config.block_size == 8
    # format 1 run dir: no meta.json; the EOS id in data_manifest.json, an AR-only run in config.yaml
    (tmp_path / "meta.json").unlink()
    (tmp_path / "data_manifest.json").write_text(json.dumps({"eos_token_id": 0}))
    (tmp_path / "config.yaml").write_text("train:\n  objective: ar\n")
    meta = read_meta(str(tmp_path))
    assert (meta.config.block_size, meta.eos_token_id) == (None, 0)
