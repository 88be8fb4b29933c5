"""Levanter-style round trips: random tiny HF model -> save_pretrained -> import -> same logits -> export ->
transformers reloads -> same logits again, tensors bit-exact; sharded inputs, sharded meshes, bf16, CLI, greedy
generate() parity."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_hf_support import (FAMILIES, MASK_ID, VOCAB, all_tensors, hf_logits, hf_model, our_logits, save_hf_dir,
                             word_tokenizer)
from tidar_jax.hf import export_hf, is_hf_dir, load_hf_dir

ATOL = 1e-4


def _tokens(seed=0, shape=(2, 9)):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


def _reload(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model.eval()


def _leaves(state):
    return jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True), ("llama", True), ("llama", False)])
def test_round_trip(tmp_path, family, tied):
    src = hf_model(family, tied, seed=7)
    hf_dir = save_hf_dir(src, tmp_path / "hf")
    assert is_hf_dir(hf_dir) and not is_hf_dir(str(tmp_path))
    bundle = load_hf_dir(hf_dir, mask_token_id=MASK_ID)
    cfg = bundle.config
    # a plain HF checkpoint records no block size: it is an AR model (no trained block size)
    assert (cfg.family, cfg.tie_embeddings, cfg.block_size) == (family, tied, None)
    tokens = _tokens()
    ref = hf_logits(src, tokens)
    np.testing.assert_allclose(our_logits(cfg, bundle.params, tokens, graphdef=bundle.graphdef), ref, atol=ATOL,
                               rtol=0)

    out = export_hf(cfg, bundle.params, str(tmp_path / "out"), tokenizer=bundle.tokenizer, max_shard_bytes=8000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files  # really sharded
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dir left behind
    from safetensors import safe_open
    for shard in shards:
        with safe_open(os.path.join(out, shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    exported = all_tensors(out)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in exported.values())

    # tensors round-trip bit-exactly, with the same names (no lm_head when tied, as transformers writes it)
    original = all_tensors(hf_dir)
    assert sorted(exported) == sorted(original)
    for name, arr in original.items():
        assert exported[name].dtype == arr.dtype and np.array_equal(exported[name], arr), name

    reloaded = _reload(out)
    assert type(reloaded).__name__ == type(src).__name__
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ref, atol=ATOL, rtol=0)
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert (hf_cfg["mask_token_id"], hf_cfg["block_size"]) == (MASK_ID, None)

    # the recorded TiDAR fields come back on re-import without being passed
    again = load_hf_dir(out)
    assert again.config == cfg and again.config.block_size is None
    for (path_a, a), (path_b, b) in zip(_leaves(bundle.params), _leaves(again.params)):
        assert path_a == path_b and np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_input_imports_like_single_file(tmp_path):
    src = hf_model("qwen2", False, seed=3)
    single = save_hf_dir(src, tmp_path / "single")
    sharded = save_hf_dir(src, tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = load_hf_dir(single, mask_token_id=MASK_ID), load_hf_dir(sharded, mask_token_id=MASK_ID)
    assert a.config == b.config
    leaves_a, leaves_b = _leaves(a.params), _leaves(b.params)
    # one stacked leaf holds a tensor per layer: count per-layer slices
    count = lambda leaves: sum(x.shape[0] if str(p[0].key) == "layers" else 1 for p, x in leaves)  # noqa: E731
    assert count(leaves_a) == count(leaves_b) == len(list(jax.tree_util.tree_leaves(src.state_dict())))
    for (pa, x), (pb, y) in zip(leaves_a, leaves_b):
        assert pa == pb and np.array_equal(np.asarray(x), np.asarray(y))


def test_load_into_mesh_shardings_and_export_from_them(tmp_path):
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh, state_shardings

    src = hf_model("qwen3", False, seed=5)
    hf_dir = save_hf_dir(src, tmp_path / "hf")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    local = load_hf_dir(hf_dir, mask_token_id=MASK_ID)
    sharded = load_hf_dir(hf_dir, mesh=mesh, mask_token_id=MASK_ID)
    want = nnx.to_pure_dict(state_shardings(abstract_model(sharded.config)[1], mesh))
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    split_any = False
    for (path, arr), (_, ref) in zip(_leaves(sharded.params), _leaves(local.params)):
        assert arr.sharding == flat_want[path], path
        assert np.array_equal(np.asarray(arr), np.asarray(ref))
        shard_shape = arr.addressable_shards[0].data.shape
        split_any |= shard_shape != arr.shape
    assert split_any  # some tensors really are split across devices (never a full copy per device)
    tokens = _tokens(1)
    np.testing.assert_allclose(our_logits(sharded.config, sharded.params, tokens, graphdef=sharded.graphdef),
                               hf_logits(src, tokens), atol=ATOL, rtol=0)
    out = export_hf(sharded.config, sharded.params, str(tmp_path / "out"))
    original, exported = all_tensors(hf_dir), all_tensors(out)
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    import ml_dtypes

    src = hf_model("llama", False, seed=11, dtype="bfloat16")
    hf_dir = save_hf_dir(src, tmp_path / "hf")
    bundle = load_hf_dir(hf_dir, mask_token_id=MASK_ID)
    assert (bundle.config.param_dtype, bundle.config.dtype) == ("bfloat16", "bfloat16")
    assert all(np.asarray(x).dtype == ml_dtypes.bfloat16 for _, x in _leaves(bundle.params))
    out = export_hf(bundle.config, bundle.params, str(tmp_path / "out"))
    original, exported = all_tensors(hf_dir), all_tensors(out)
    assert all(exported[k].dtype == ml_dtypes.bfloat16 and
               np.array_equal(exported[k].view(np.uint16), original[k].view(np.uint16)) for k in original)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    # and an explicit float32 import upcasts exactly
    f32 = load_hf_dir(hf_dir, mask_token_id=MASK_ID, dtype="float32")
    for (_, a), (_, b) in zip(_leaves(f32.params), _leaves(bundle.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


def test_mask_token_policy(tmp_path):
    from tidar_jax.hf import HFFormatError, hf_config_to_model_config

    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 1, "intermediate_size": 48,
            "vocab_size": 151936}
    assert hf_config_to_model_config(base).mask_token_id == 151662  # Qwen vocabulary: <|fim_pad|>
    assert hf_config_to_model_config({**base, "mask_token_id": 7}).mask_token_id == 7  # recorded TiDAR field
    assert hf_config_to_model_config(base, mask_token_id=9).mask_token_id == 9  # explicit wins
    llama = {**base, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(HFFormatError, match="no mask_token_id .* add_mask_token=True"):
        hf_config_to_model_config(llama)
    with pytest.raises(HFFormatError, match="mask_token_id=999999"):
        hf_config_to_model_config(base, mask_token_id=999999)

    # add_mask_token with a free embedding row: the tokenizer (90 words) is smaller than the embedding (96 rows)
    src = hf_model("llama", False, seed=2)
    free = save_hf_dir(src, tmp_path / "free", tokenizer=word_tokenizer(90))
    b = load_hf_dir(free, add_mask_token=True)
    assert (b.config.mask_token_id, b.config.vocab_size) == (90, VOCAB)
    assert b.tokenizer.token_to_id("<|mask|>") == 90

    # no free row: the embedding and the head grow by one mean-initialised row; old logits are unchanged
    full = save_hf_dir(src, tmp_path / "full", tokenizer=word_tokenizer(VOCAB))
    g = load_hf_dir(full, add_mask_token=True)
    assert (g.config.mask_token_id, g.config.vocab_size) == (VOCAB, VOCAB + 1)
    embed = np.asarray(nnx.to_pure_dict(g.params)["embed"])
    head = np.asarray(nnx.to_pure_dict(g.params)["lm_head"])
    np.testing.assert_allclose(embed[VOCAB], embed[:VOCAB].mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head[:, VOCAB], head[:, :VOCAB].mean(1), rtol=1e-6, atol=1e-7)
    tokens = _tokens(3)
    np.testing.assert_allclose(our_logits(g.config, g.params, tokens, graphdef=g.graphdef)[..., :VOCAB],
                               hf_logits(src, tokens), atol=ATOL, rtol=0)
    # the grown model exports to a checkpoint transformers loads, mask token in its tokenizer
    out = export_hf(g.config, g.params, str(tmp_path / "grown_out"), tokenizer=g.tokenizer)
    assert _reload(out).config.vocab_size == VOCAB + 1
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(os.path.join(out, "tokenizer.json")).token_to_id("<|mask|>") == VOCAB
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).mask_token_id == VOCAB  # tokenizer_config.json names it


def test_cli_import_then_export(tmp_path):
    from tidar_jax.convert import main
    from tidar_jax.loading import load_for_inference
    from tidar_jax.checkpoint.params import is_params_dir

    src = hf_model("qwen2", True, seed=13)
    src.generation_config.eos_token_id = 5
    hf_dir = save_hf_dir(src, tmp_path / "hf")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert main(["import-hf", hf_dir, ckpt, "--mask-token-id", str(MASK_ID), "--block-size", "4"]) == 0
    assert is_params_dir(ckpt)
    bundle = load_for_inference(ckpt)  # what decode.py / train.py load
    assert (bundle.config.block_size, bundle.config.mask_token_id, bundle.eos_token_id) == (4, MASK_ID, 5)
    assert bundle.tokenizer is not None and bundle.tokenizer.get_vocab_size() == VOCAB
    tokens = _tokens(4)
    ref = hf_logits(src, tokens)
    np.testing.assert_allclose(our_logits(bundle.config, bundle.params, tokens, graphdef=bundle.graphdef), ref,
                               atol=ATOL, rtol=0)
    assert main(["export-hf", ckpt, out, "--max-shard-size", "10KB"]) == 0
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert (hf_cfg["block_size"], hf_cfg["mask_token_id"], hf_cfg["eos_token_id"]) == (4, MASK_ID, 5)
    assert hf_cfg["max_position_embeddings"] == src.config.max_position_embeddings
    np.testing.assert_allclose(hf_logits(_reload(out), tokens), ref, atol=ATOL, rtol=0)
    original, exported = all_tensors(hf_dir), all_tensors(out)
    assert all(np.array_equal(original[k], exported[k]) for k in original) and sorted(original) == sorted(exported)


def _our_greedy(bundle, prompt_NP, steps):
    """Plain greedy decoding by full recompute (independent of any KV cache logic). The buffer has its final
    length from the start (one shape, so ops compile once); causal attention makes the unfilled tail invisible."""
    n, p = np.shape(prompt_NP)
    tokens = np.zeros((n, p + steps), np.int64)
    tokens[:, :p] = prompt_NP
    for cur in range(p, p + steps):
        logits = our_logits(bundle.config, bundle.params, tokens, graphdef=bundle.graphdef)
        tokens[:, cur] = logits[:, cur - 1].argmax(-1)
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_generate_matches_our_greedy(tmp_path, family):
    import torch

    src = hf_model(family, family == "qwen3", seed=17)
    bundle = load_hf_dir(save_hf_dir(src, tmp_path / "hf"), mask_token_id=MASK_ID)
    out = export_hf(bundle.config, bundle.params, str(tmp_path / "out"))
    model = _reload(out)
    prompt = _tokens(5, (2, 5))
    steps = 8
    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor(prompt), max_new_tokens=steps, do_sample=False,
                                   attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    ours = _our_greedy(bundle, prompt, steps)
    assert hf_tokens.shape == (2, 5 + steps)
    np.testing.assert_array_equal(ours, hf_tokens)
    assert len(set(ours[:, 5:].ravel().tolist())) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize("mode", ["ar", pytest.param("tidar", marks=pytest.mark.slow)])
def test_transformers_generate_matches_decode_api(tmp_path, mode):
    """The project's decoder (``tidar_jax.decode.generate``) on a re-imported exported checkpoint reproduces
    transformers' greedy generate(): AR mode, and TiDAR mode with beta=1 (greedy output must equal greedy AR;
    slow: it compiles the TiDAR step program)."""
    import torch

    decode = pytest.importorskip("tidar_jax.decode")
    src = hf_model("qwen3", False, seed=19)
    bundle = load_hf_dir(save_hf_dir(src, tmp_path / "hf"), mask_token_id=MASK_ID, block_size=4)
    out = export_hf(bundle.config, bundle.params, str(tmp_path / "out"))
    reloaded_bundle = load_hf_dir(out)  # what `decode.py HF_DIR` loads
    prompt = _tokens(6, (2, 5))
    steps = 8
    with torch.no_grad():
        hf_tokens = _reload(out).generate(torch.tensor(prompt), max_new_tokens=steps, do_sample=False,
                                          attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    result = decode.generate(reloaded_bundle, prompt.tolist(), mode=mode, max_new_tokens=steps, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(result.tokens), hf_tokens[:, 5:])


def test_qwen_tokenizer_gives_fim_pad_mask_token(tmp_path):
    """A non-Qwen architecture with a Qwen-sized vocabulary whose tokenizer has <|fim_pad|> at 151662 uses it;
    without that token it must ask for a mask token. (Weights written with numpy: the rule is about the
    tokenizer, and a 151k-row torch model is slow to build.)"""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models

    from tidar_jax.config import ModelConfig
    from tidar_jax.hf import HFFormatError, bound_keys, model_config_to_hf_config

    cfg = ModelConfig(vocab_size=151680, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=8,
                      mask_token_id=0, family="llama")
    hf_cfg = model_config_to_hf_config(cfg)
    del hf_cfg["mask_token_id"]  # a plain HF checkpoint records no TiDAR fields
    words = {f"t{i}": i for i in range(151662)}
    for name, tok in (("qwen_tok", Tokenizer(models.WordLevel({**words, "<|fim_pad|>": 151662}, unk_token="t0"))),
                      ("plain_tok", Tokenizer(models.WordLevel(words, unk_token="t0")))):
        path = tmp_path / name
        path.mkdir()
        json.dump(hf_cfg, open(path / "config.json", "w"))
        save_file({k.hf_name: np.ones(k.hf_shape, np.float32) for k in bound_keys(cfg)},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(path / "tokenizer.json"))
    bundle = load_hf_dir(str(tmp_path / "qwen_tok"))
    assert (bundle.config.mask_token_id, bundle.config.vocab_size) == (151662, 151680)
    # no rule applies: a stock model without [MASK] (AR decoding needs none), unless one is required (import-hf)
    assert load_hf_dir(str(tmp_path / "plain_tok")).config.mask_token_id is None
    with pytest.raises(HFFormatError, match="no mask_token_id for this llama model"):
        load_hf_dir(str(tmp_path / "plain_tok"), require_mask_token=True)
