"""Shared builders for the HF tests (no tests here): tiny random HF models, tokenizers, reference forwards."""

from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 96
MASK_ID = 3  # an existing id reused as [MASK] in the tiny vocabularies

# (family, tied): every family with GQA (4 query heads, 2 kv heads), tied and untied heads
FAMILIES = ("qwen2", "qwen3", "llama")
FAMILY_CASES = [(f, t) for f in FAMILIES for t in (False, True)]


def hf_model(family: str, tied: bool, *, vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, mlp=48, seed=0,
             dtype="float32", rope_theta=None):
    """A tiny randomly initialised transformers model. Every parameter (norm scales and biases included) is
    random so a mapping mistake anywhere changes the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    if rope_theta is None:  # non-default per family, so a dropped rope_theta mapping changes the logits
        rope_theta = {"qwen2": 1e6, "qwen3": 5e5, "llama": 500.0}[family]
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6, rope_theta=rope_theta, max_position_embeddings=256, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":  # explicit head_dim != hidden // heads, as in real Qwen3
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=12, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    model = model.to(getattr(torch, dtype)).eval()
    model.config._attn_implementation = "eager"  # custom 4-D float masks need eager (environment.md §6)
    return model


def word_tokenizer(vocab=VOCAB, extra_specials=()):
    """A WordLevel tokenizer with ids 0..vocab-1 named ``t{i}`` (whitespace pre-tokenised)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if extra_specials:
        tok.add_special_tokens([AddedToken(s, special=True) for s in extra_specials])
    return tok


def save_hf_dir(model, path, tokenizer=None, max_shard_size=None):
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    (tokenizer or word_tokenizer(model.config.vocab_size)).save(os.path.join(path, "tokenizer.json"))
    return str(path)


def hf_logits(model, tokens_NT, positions_NT=None, mask_NTT=None):
    """Reference logits from transformers; a boolean mask becomes the additive float mask eager needs."""
    import torch

    kwargs = {}
    if positions_NT is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions_NT), dtype=torch.long)
    if mask_NTT is not None:
        allow = torch.tensor(np.asarray(mask_NTT))
        dt = next(model.parameters()).dtype
        additive = torch.zeros(allow.shape, dtype=dt).masked_fill(~allow, torch.finfo(dt).min)
        kwargs["attention_mask"] = additive[:, None]
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens_NT), dtype=torch.long), **kwargs).logits.float().numpy()


def our_logits(bundle_or_cfg, params=None, tokens_NT=None, positions_NT=None, mask_NTT=None, graphdef=None):
    import jax.numpy as jnp

    from tidar_jax import masks
    from tidar_jax.model import apply, causal_mask

    tokens_NT = np.asarray(tokens_NT)
    n, t = tokens_NT.shape
    if positions_NT is None:
        positions_NT = np.broadcast_to(np.arange(t), (n, t))
    if mask_NTT is None:
        mask = causal_mask(n, t)
    else:  # a layout object passes through (the model's cfg.attention kernel), a dense mask runs the reference
        mask = mask_NTT if masks.is_layout(mask_NTT) else jnp.asarray(mask_NTT)
    logits, _ = apply(graphdef, params, jnp.asarray(tokens_NT), jnp.asarray(positions_NT), mask)
    return np.asarray(logits, dtype=np.float32)



def all_tensors(hf_dir) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or index), via safetensors numpy."""
    from safetensors.numpy import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(hf_dir, f)))
    return out
