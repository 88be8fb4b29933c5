"""A llama-architecture GGUF file -> a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
generation_config.json, tokenizer_config.json) that ``load_hf_dir`` and transformers both load.

Read with the ``gguf`` package (llama.cpp's own reader and dequantizer, pure Python + numpy), so the main install
needs no torch; transformers' GGUF loader (which needs torch) is the reference the tests compare against. Tensors
are dequantized to float32. llama.cpp's converter permutes the rows of q/k into its rotary layout; they are
permuted back here. Everything is validated (architecture, quantization types, shapes, tokenizer) before anything
is written, and the directory appears whole or not at all (``tidar_jax.checkpoint.atomic``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from tidar_jax.checkpoint.atomic import atomic_dir
from tidar_jax.hf.keys import HFFormatError

SUPPORTED_ARCHITECTURES = ("llama",)
# gguf.GGMLQuantizationType names whose dequantization gguf.quants implements and that we have checked
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_TOKEN_TYPE_CONTROL = 3


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise HFFormatError("reading GGUF needs the gguf package: pip install gguf") from None
    if not os.path.isfile(path):
        raise HFFormatError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # truncated or not GGUF: the reader raises ValueError/struct errors of many kinds
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HFFormatError(f"{path}: not a readable GGUF file ({reason})") from None


def _field(reader, key: str, path: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise HFFormatError(f"{path}: GGUF metadata has no {key}")
    return field.contents()


def _hf_name(gguf_name: str, num_layers: int, path: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES \
            and int(parts[1]) < num_layers:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise HFFormatError(f"{path}: tensor {gguf_name!r} has no Hugging Face llama counterpart")


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (per head: interleaved rotary pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, path: str) -> dict:
    """``config.json`` of the HF llama model the GGUF metadata describes."""
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFFormatError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    g = lambda key, default=None: _field(reader, f"{arch}.{key}", path, default)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(g("vocab_size", len(tokens.data) if tokens is not None else 0))
    head_dim = int(g("rope.dimension_count", hidden // heads))
    if g("rope.scaling.type", "none") not in ("none",):
        raise HFFormatError(f"{path}: rope scaling {g('rope.scaling.type')!r} is not supported (only none)")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")), "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)), "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names, "dtype": "float32",
        "bos_token_id": _opt_int(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _opt_int(reader, "tokenizer.ggml.eos_token_id"),
    }


def _opt_int(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else int(field.contents())


def gguf_tokenizer(reader, path: str):
    """A ``tokenizers.Tokenizer`` from the GGUF's byte-level BPE (``tokenizer.ggml.model == 'gpt2'``): vocab, merges,
    control tokens as special added tokens; the pre-tokenizer llama.cpp applies for the recorded ``pre`` name."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise HFFormatError(f"{path}: GGUF tokenizer model {model!r} is not supported (only gpt2 byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    merges = _field(reader, "tokenizer.ggml.merges", path)
    types = _field(reader, "tokenizer.ggml.token_type", path, default=[1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", path, default="default")
    # llama.cpp's "smollm"/"starcoder" pre-tokenizers split every digit before the GPT-2 regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if pre in ("smollm", "starcoder", "refact") else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_CONTROL])
    return tok


def _check_tensors(reader, cfg: dict, path: str) -> None:
    import gguf

    n = cfg["num_hidden_layers"]
    seen = set()
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in SUPPORTED_QUANT_TYPES:
            raise HFFormatError(f"{path}: tensor {t.name} has quantization type {kind}, not supported (supported: "
                                f"{', '.join(SUPPORTED_QUANT_TYPES)})")
        seen.add(_hf_name(t.name, n, path))
    expected = {f"model.layers.{i}.{v}" for i in range(n) for v in _LAYER_NAMES.values()}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    missing = sorted(expected - seen)
    if missing:
        raise HFFormatError(f"{path}: missing tensor(s) {missing[:3]} that the GGUF llama metadata implies")


def _tensors(reader, cfg: dict):
    """``(hf_name, float32 array in HF layout)``, one at a time."""
    import gguf

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for t in reader.tensors:
        name = _hf_name(t.name, cfg["num_hidden_layers"], "")
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # numpy shape is the reverse of GGUF's ne[] order: (out_features, in_features), as HF stores it
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            arr = _unpermute_rows(arr, heads)
        elif name.endswith("k_proj.weight"):
            arr = _unpermute_rows(arr, kv_heads)
        yield name, np.ascontiguousarray(arr)


def import_gguf(gguf_path: str, out_dir: str) -> str:
    """Write the HF directory of ``gguf_path`` to ``out_dir`` (which must not exist); returns ``out_dir``."""
    from safetensors.numpy import save_file

    from tidar_jax.output_paths import check_new_dir

    check_new_dir(out_dir)
    reader = _reader(gguf_path)
    cfg = gguf_config(reader, gguf_path)
    _check_tensors(reader, cfg, gguf_path)
    tok = gguf_tokenizer(reader, gguf_path)
    template = reader.fields.get("tokenizer.chat_template")
    with atomic_dir(out_dir) as tmp:
        tensors = {}
        for name, arr in _tensors(reader, cfg):
            expected = _expected_shape(name, cfg)
            if arr.shape != expected:
                raise HFFormatError(f"{gguf_path}: tensor {name} has shape {arr.shape}, the metadata implies "
                                    f"{expected}")
            tensors[name] = arr
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg[k] is not None}, f, indent=2)
        tokens = _field(reader, "tokenizer.ggml.tokens", gguf_path)
        special = {k: tokens[cfg[f"{k}_id"]] for k in ("bos_token", "eos_token") if cfg[f"{k}_id"] is not None}
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"],
                   "add_bos_token": False, **special}
        if template is not None:
            tok_cfg["chat_template"] = template.contents()
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
    return out_dir


def _expected_shape(name: str, cfg: dict) -> tuple[int, ...]:
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    table = {"embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,),
             "layernorm.weight": (d,), "q_proj.weight": (q, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d),
             "o_proj.weight": (d, q), "gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
    return next(shape for suffix, shape in table.items() if name.endswith(suffix))
