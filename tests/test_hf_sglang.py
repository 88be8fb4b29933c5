"""``export-hf --for sglang-tidar``: the directory the authors' SGLang TiDAR server loads, checked against what
their code reads (docs/hf.md cites the files), and the one-line refusals.

The loader's expectations are written here from their code, not from our key table: the module tree SGLang's
``Qwen2ForCausalLM``/``Qwen3ForCausalLM`` build from ``config.json`` (fused ``qkv_proj`` and ``gate_up_proj``),
and their ``load_weights`` rules (skip ``rotary_emb.inv_freq``; skip ``lm_head.weight`` when the head is tied; map
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` onto slices of the fused weights; every other name
must be a parameter of the same shape). On top of what the loader enforces, every parameter must be filled.
"""

from __future__ import annotations

import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.checkpoint import CheckpointMeta
from tidar_jax.checkpoint.params import save_params
from tidar_jax.config import ModelConfig
from tidar_jax.convert import main
from tidar_jax.model.functional import abstract_model

QWEN_VOCAB = 151680  # > 151662 (the server's mask token), a multiple of 16
FIM_PAD, ENDOFTEXT = 151662, 151643
# as in their code: the class per config family, the fixed mask id in the worker, the block-size server flag
SERVER_CLASS = {"qwen2": "TiDARSmallForCausalLM", "qwen3": "TiDARForCausalLM"}


@functools.lru_cache(maxsize=2)
def qwen_like_tokenizer(vocab=QWEN_VOCAB, specials=((ENDOFTEXT, "<|endoftext|>"), (FIM_PAD, "<|fim_pad|>"))):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab)}
    for tid, name in specials:
        del words[f"t{tid}"]
        words[name] = tid
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def small_config(family, **kw):
    base = dict(vocab_size=QWEN_VOCAB, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=24,
                mask_token_id=FIM_PAD, block_size=4, family=family, qkv_bias=family == "qwen2",
                qk_norm=family == "qwen3", rope_theta={"qwen2": 1e6, "qwen3": 5e5, "llama": 5e5}[family])
    if family == "qwen3":
        base["head_dim"] = 6  # != hidden // heads, as in real Qwen3
    base.update(kw)
    return ModelConfig(**base)


def random_state(cfg, seed, scale=0.15):
    """Every parameter random (norm scales near 1, biases too), so any misplaced tensor changes the logits;
    ``scale=0``: norm scales 1, the rest 0 (a checkpoint whose values do not matter)."""
    _, abstract = abstract_model(cfg)
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        noise = rng.standard_normal(a.shape).astype(np.float32)
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + (scale * (0.7 if base else 1.0)) * noise, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# the sampling defaults of the source model a checkpoint carries (the server export requires them)
GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def make_checkpoint(path, cfg, seed=0, tokenizer="qwen", eos=ENDOFTEXT, scale=0.15, generation=GENERATION):
    state = random_state(cfg, seed, scale)
    tok = qwen_like_tokenizer() if tokenizer == "qwen" else tokenizer
    record = None if generation is None else {"generation_config": dict(generation)}
    save_params(str(path), CheckpointMeta(cfg, eos_token_ids=(eos,), hf=record), state, tokenizer=tok)
    return str(path), state


def safetensors_headers(out_dir):
    """name -> (dtype, shape) of every tensor, read from the safetensors headers (8-byte length + JSON)."""
    out = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(out_dir, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return out


def sglang_parameters(hf):
    """name -> shape of the parameters SGLang's Qwen2/Qwen3 ForCausalLM create from this config.json
    (tp=1, pp=1). Qwen2: q/k/v bias always, no q/k norm, head_dim from config or hidden // heads;
    Qwen3: q_norm/k_norm of head_dim, biases only with attention_bias; lm_head shares embed_tokens when tied."""
    family = hf["model_type"]
    d, heads, kv, inter = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], \
        hf["intermediate_size"]
    hd = hf.get("head_dim") or d // heads
    qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
    params = {"model.embed_tokens.weight": (hf["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        params[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * hd, d)
        if qkv_bias:
            params[p + "self_attn.qkv_proj.bias"] = ((heads + 2 * kv) * hd,)
        params[p + "self_attn.o_proj.weight"] = (d, heads * hd)
        if family == "qwen3":
            params[p + "self_attn.q_norm.weight"] = (hd,)
            params[p + "self_attn.k_norm.weight"] = (hd,)
            if qkv_bias:
                params[p + "self_attn.o_proj.bias"] = (d,)
        params[p + "mlp.gate_up_proj.weight"] = (2 * inter, d)
        params[p + "mlp.down_proj.weight"] = (d, inter)
        params[p + "input_layernorm.weight"] = (d,)
        params[p + "post_attention_layernorm.weight"] = (d,)
    if not hf.get("tie_word_embeddings", False):
        params["lm_head.weight"] = (hf["vocab_size"], d)
    return params, hd


def emulate_load_weights(hf, tensors):
    """Run their load_weights rules over the file's tensors; return the rows filled per parameter."""
    params, hd = sglang_parameters(hf)
    heads, kv, inter = hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]
    # (fused name, shard name, rows of the fused tensor that shard fills)
    stacked = [("qkv_proj", "q_proj", (0, heads * hd)), ("qkv_proj", "k_proj", (heads * hd, (heads + kv) * hd)),
               ("qkv_proj", "v_proj", ((heads + kv) * hd, (heads + 2 * kv) * hd)),
               ("gate_up_proj", "gate_proj", (0, inter)), ("gate_up_proj", "up_proj", (inter, 2 * inter))]
    filled = {name: np.zeros(shape[0], bool) for name, shape in params.items()}
    for name, shape in tensors.items():
        if "rotary_emb.inv_freq" in name:
            continue
        if hf.get("tie_word_embeddings") and "lm_head.weight" in name:
            continue
        for fused, shard, (lo, hi) in stacked:
            if shard in name:
                target = name.replace(shard, fused)
                assert target in params, f"{name}: the loader has no {target}"
                assert shape == (hi - lo,) + params[target][1:], f"{name} {shape} does not fit {target}[{lo}:{hi}]"
                filled[target][lo:hi] = True
                break
        else:
            assert name in params, f"{name}: not a parameter of the SGLang model (it would be dropped or fail)"
            assert shape == params[name], f"{name}: shape {shape}, the SGLang parameter is {params[name]}"
            filled[name][:] = True
    return filled


@pytest.fixture(scope="module", params=[("qwen2", True), ("qwen3", False)], ids=["qwen2-tied", "qwen3-untied"])
def exported(request, tmp_path_factory):
    family, tied = request.param
    tmp = tmp_path_factory.mktemp(f"sglang_{family}")
    cfg = small_config(family, tie_embeddings=tied)
    ckpt, state = make_checkpoint(tmp / "ckpt", cfg, seed=3)
    out = str(tmp / f"tidar_{family}_sglang")
    assert main(["export-hf", ckpt, out, "--for", "sglang-tidar", "--max-shard-size", "4MB"]) == 0
    return cfg, state, ckpt, out


def test_config_names_the_servers_class_and_fields(exported):
    cfg, _, _, out = exported
    hf = json.load(open(os.path.join(out, "config.json")))
    # the model registry resolves architectures[0]; server_args turns on TIDAR for a name starting with "TiDAR"
    assert hf["architectures"] == [SERVER_CLASS[cfg.family]] and hf["architectures"][0].startswith("TiDAR")
    assert hf["model_type"] == cfg.family  # what builds the Qwen2Config/Qwen3Config the classes receive
    # the transformers-4 fields (a 4.x AutoConfig without rope_theta silently uses 10000; docs/hf.md)
    assert hf["rope_theta"] == cfg.rope_theta and hf["torch_dtype"] == "bfloat16"
    assert hf["mask_token_id"] == FIM_PAD and hf["block_size"] == cfg.block_size
    assert hf["tie_word_embeddings"] == cfg.tie_embeddings and hf["eos_token_id"] == ENDOFTEXT
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == ENDOFTEXT  # SGLang stops on config.json's and generation_config.json's EOS ids


def test_weights_fill_the_servers_loader(exported):
    cfg, _, _, out = exported
    hf = json.load(open(os.path.join(out, "config.json")))
    tensors = safetensors_headers(out)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # the index path is used
    assert {dt for dt, _ in tensors.values()} == {"BF16"}
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
    filled = emulate_load_weights(hf, {k: shape for k, (_, shape) in tensors.items()})
    empty = [name for name, rows in filled.items() if not rows.all()]
    assert not empty, f"parameters the export leaves unset: {empty}"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert sorted(index["weight_map"]) == sorted(tensors)


def test_tokenizer_and_readme(exported):
    cfg, _, _, out = exported
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # the server's tokenizer path defaults to the model path
    assert tok.convert_ids_to_tokens(FIM_PAD) == "<|fim_pad|>" and tok.mask_token_id == FIM_PAD
    text = open(os.path.join(out, "README.md")).read()
    assert "python -m sglang.launch_server" in text and f"--model-path {os.path.abspath(out)}" in text
    assert f"--speculative-tidar-b {cfg.block_size}" in text
    for flag in ("--max-running-requests 1", "--disable-overlap-schedule", "--disable-radix-cache",
                 "--chunked-prefill-size -1"):
        assert flag in text


def test_transformers_loads_it_and_logits_match_ours(exported):
    """transformers reads the same directory (the TiDAR class name is ignored there: model_type picks Qwen2/Qwen3);
    its fp32 logits from the bf16 weights equal ours from our params rounded to bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from tidar_jax.model import apply, causal_mask

    cfg, state, _, out = exported
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
    tokens = np.random.RandomState(0).randint(0, QWEN_VOCAB, (2, 7))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.float().numpy()
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state)
    graphdef, _ = abstract_model(cfg)
    ours, _ = apply(graphdef, rounded, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(7), (2, 7)),
                    causal_mask(2, 7))
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=1e-4, rtol=0)


def test_plain_export_is_unchanged(exported, tmp_path):
    """Without --for: the transformers class names, no README, no transformers-4 fields; the same tensors."""
    cfg, _, ckpt, out = exported
    plain = str(tmp_path / "plain")
    assert main(["export-hf", ckpt, plain, "--dtype", "bfloat16", "--max-shard-size", "4MB"]) == 0
    a = json.load(open(os.path.join(plain, "config.json")))
    b = json.load(open(os.path.join(out, "config.json")))
    assert a["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]]
    assert "README.md" not in os.listdir(plain) and "rope_theta" not in a and "torch_dtype" not in a
    assert {k for k in set(a) | set(b) if k not in a or k not in b or a[k] != b[k]} == {
        "architectures", "rope_theta", "torch_dtype"}
    for name in sorted(os.listdir(plain)):
        if name.endswith(".safetensors"):
            assert open(os.path.join(plain, name), "rb").read() == open(os.path.join(out, name), "rb").read()


def _refusal(tmp_path, capsys, cfg, match, **kw):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", cfg, scale=0.0, **kw)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["export-hf", ckpt, str(out), "--for", "sglang-tidar"])
    message = str(e.value)
    assert message.startswith("error: --for sglang-tidar: ") and "\n" not in message and match in message, message
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing written, no temp dir


TINY = dict(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=8, tie_embeddings=True)


def test_refuses_llama(tmp_path, capsys):
    _refusal(tmp_path, capsys, small_config("llama", **TINY), "family 'llama'")


def test_refuses_another_mask_token(tmp_path, capsys):
    _refusal(tmp_path, capsys, small_config("qwen2", mask_token_id=7, **TINY), "mask token id 7")


def test_refuses_a_vocabulary_that_is_not_qwens(tmp_path, capsys):
    _refusal(tmp_path, capsys, small_config("qwen3", **TINY), "vocabulary is not Qwen's",
             tokenizer=qwen_like_tokenizer(specials=()))


def test_refuses_an_ar_only_model(tmp_path, capsys):
    _refusal(tmp_path, capsys, small_config("qwen2", block_size=None, **TINY), "no trained block size")


def test_refuses_without_a_tokenizer(tmp_path, capsys):
    _refusal(tmp_path, capsys, small_config("qwen2", **TINY), "has no tokenizer", tokenizer=None)


@pytest.mark.parametrize("sub", ["", "checkpoints/2"], ids=["run-dir", "step-dir"])
def test_run_dirs_are_checked_from_their_record(tmp_path, sub):
    """A training run dir (and one of its step dirs) is judged from its record, before its weights are read."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "run_v1"), run)
    with pytest.raises(SystemExit) as e:
        main(["export-hf", str(run / sub), str(tmp_path / "out"), "--for", "sglang-tidar"])
    assert str(e.value) == ("error: --for sglang-tidar: mask token id 1: the server's worker hard-codes 151662 "
                            "(<|fim_pad|>), so the model must be trained with that mask token")
    assert sorted(os.listdir(tmp_path)) == ["run"]
