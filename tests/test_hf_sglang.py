"""``export-hf --for sglang-tidar``: the directory the authors' SGLang TiDAR server loads, checked against what
their code reads (docs/hf.md cites the files), and the one-line refusals.

The server's weight loading runs as SGLang 0.5.5 wrote it (``tests/sglang_wheel.py``: ``load_weights`` and the
layer loaders it calls, taken from the pinned wheel), over parameters shaped as SGLang's layers create them from
the export's ``config.json``; every parameter must be filled, once, with the file's tensors.
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


@pytest.fixture(scope="session")
def sglang_loaders(request, tmp_path_factory):
    """SGLang 0.5.5's own weight-loading functions (``tests/sglang_wheel.py``; skips where the wheel cannot be
    fetched); the wheel is kept in pytest's cache (in a temporary dir when the cache plugin is off)."""
    from sglang_wheel import Loaders, fetch_wheel

    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("sglang-wheel") if cache is not None else tmp_path_factory.mktemp("sglang-wheel")
    return Loaders(fetch_wheel(str(cache_dir)))


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
    tensors = safetensors_headers(out)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # the index path is used
    assert {dt for dt, _ in tensors.values()} == {"BF16"}
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert sorted(index["weight_map"]) == sorted(tensors)


def test_servers_own_loader_fills_every_parameter_once(exported, sglang_loaders):
    """SGLang's ``load_weights`` and layer loaders, from the wheel, over the export's files: every parameter is
    written (they start as NaN), every loader is called once per parameter and shard, and each fused parameter
    holds the file's tensors in the order SGLang's forward splits them (q, k, v; gate, up)."""
    import torch
    from safetensors.torch import load_file

    from sglang_wheel import build_model

    cfg, _, _, out = exported
    hf = json.load(open(os.path.join(out, "config.json")))
    files = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            files.update(load_file(os.path.join(out, name)))
    model, params, calls = build_model(sglang_loaders, hf, out)
    sglang_loaders.load_weights[cfg.family](model, iter(files.items()))

    assert not [n for n, p in params.items() if torch.isnan(p).any()], "parameters the loader left unset"
    shards = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}
    want_calls = {}
    for n, p in params.items():
        if hasattr(p, "weight_loader"):
            fused = [ids for key, ids in shards.items() if key in n]
            for shard in (fused[0] if fused else [None]):
                want_calls[(n,) if shard is None else (n, shard)] = 1
    assert calls == want_calls
    vocab = hf["vocab_size"]
    for n, p in params.items():
        if "qkv_proj" in n:
            want = torch.cat([files[n.replace("qkv_proj", s)] for s in ("q_proj", "k_proj", "v_proj")])
        elif "gate_up_proj" in n:
            want = torch.cat([files[n.replace("gate_up_proj", s)] for s in ("gate_proj", "up_proj")])
        else:
            want = files[n]
        if n in ("model.embed_tokens.weight", "lm_head.weight"):  # rows padded to a multiple of 64, zero-filled
            assert p.shape[0] % 64 == 0 and not p.data[vocab:].any()
            got = p.data[:vocab]
        else:
            got = p.data
        assert torch.equal(got, want.float()), n


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
