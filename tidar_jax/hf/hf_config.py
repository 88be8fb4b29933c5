"""``config.json`` (transformers 5 layout, ``rope_parameters``; the v4 layout is also read) <-> ``ModelConfig``."""

from __future__ import annotations

from typing import Any

from tidar_jax.config import DEFAULT_BLOCK_SIZE  # noqa: F401 (re-exported by tidar_jax.hf)
from tidar_jax.config import ConfigError, ModelConfig, resolve_mask_token
from tidar_jax.hf.keys import HFFormatError

# family -> (architecture class name, model_type)
ARCHITECTURES = {
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "llama": ("LlamaForCausalLM", "llama"),
}
_FAMILY_BY_ARCH = {arch: fam for fam, (arch, _) in ARCHITECTURES.items()}
_FAMILY_BY_MODEL_TYPE = {mt: fam for fam, (_, mt) in ARCHITECTURES.items()}

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64",
                "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DEFAULT_MAX_POSITIONS = {"qwen2": 32768, "qwen3": 40960, "llama": 2048}


def family_of(hf: dict[str, Any]) -> str:
    """``qwen2`` | ``qwen3`` | ``llama`` from ``architectures`` (or ``model_type``); one-line error otherwise."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _FAMILY_BY_ARCH:
            return _FAMILY_BY_ARCH[arch]
    if not archs and hf.get("model_type") in _FAMILY_BY_MODEL_TYPE:
        return _FAMILY_BY_MODEL_TYPE[hf["model_type"]]
    supported = ", ".join(a for a, _ in ARCHITECTURES.values())
    found = archs or [hf.get("model_type")]
    raise HFFormatError(f"unsupported architecture {found}: supported are {supported}")


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise HFFormatError(f"config.json has no {key!r}, which is required")
    return hf[key]


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:  # transformers 4 layout: top-level rope_theta (+ rope_scaling)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = hf.get("rope_theta", 10000.0)
    if rope_type not in ("default", None):
        raise HFFormatError(f"rope_type={rope_type!r} is not supported (only plain RoPE, rope_type 'default')")
    return float(theta)


def _dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise HFFormatError(f"config.json dtype={name!r} is not supported: use one of float32, bfloat16, float16")
    return _DTYPE_NAMES[name]


def hf_config_to_model_config(hf: dict[str, Any], *, mask_token_id: int | None = None, block_size: int | None = None,
                              dtype: str | None = None, vocab_size: int | None = None,
                              require_mask_token: bool = True) -> ModelConfig:
    """Our ``ModelConfig`` from a parsed HF ``config.json``.

    ``mask_token_id``: ``tidar_jax.config.resolve_mask_token`` (explicit > the TiDAR field recorded in
    ``config.json`` > 151662 for a Qwen vocabulary); unresolved -> ``HFFormatError``. ``tidar_jax.hf.load_hf_dir``
    resolves it with the tokenizer first. ``block_size`` (the trained block size): explicit > recorded > None
    (a plain HF checkpoint is an AR model: it records none). ``vocab_size``: the model's vocabulary when it grows
    beyond the stored one (an added [MASK] row). ``dtype`` sets both compute and parameter dtype (default: the
    checkpoint's ``dtype``). ``require_mask_token=False``: no [MASK] id resolved gives ``mask_token_id=None``
    (a stock model, decoded AR) instead of the error.
    """
    family = family_of(hf)
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFFormatError(f"hidden_act={act!r} is not supported (only 'silu', the SwiGLU MLP)")
    if hf.get("use_sliding_window"):
        raise HFFormatError("use_sliding_window=true is not supported (the model uses full attention only)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise HFFormatError(f"layer_types {sorted(set(layer_types))} not supported (only 'full_attention')")
    if hf.get("mlp_bias"):
        raise HFFormatError("mlp_bias=true is not supported (the MLP has no biases)")
    if family in ("qwen3", "llama") and hf.get("attention_bias"):
        raise HFFormatError(f"attention_bias=true for {family} is not supported: it also adds an o_proj bias, "
                            "which this model does not have")
    if int(hf.get("pretraining_tp", 1) or 1) != 1:
        raise HFFormatError(f"pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")

    hidden = int(_require(hf, "hidden_size"))
    heads = int(_require(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") if family != "qwen2" else None  # Qwen2 always uses hidden // heads
    vocab = int(_require(hf, "vocab_size"))
    mask_token_id = resolve_mask_token(mask_token_id, hf.get("mask_token_id"), vocab_size=vocab,
                                       qwen=family in ("qwen2", "qwen3"))
    if mask_token_id is None and require_mask_token:
        raise HFFormatError(
            f"no mask_token_id for this {family} model (vocab_size={vocab}): pass mask_token_id=<existing token id> "
            "(--mask-token-id N) or add_mask_token=True (--add-mask-token) to append <|mask|> to the tokenizer")
    if block_size is None:
        block_size = hf.get("block_size")
    dt = _dtype(hf) if dtype is None else dtype
    try:
        return ModelConfig(
            vocab_size=vocab if vocab_size is None else vocab_size,
            hidden_size=hidden,
            num_layers=int(_require(hf, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=None if head_dim is None else int(head_dim),
            mlp_size=int(_require(hf, "intermediate_size")),
            rope_theta=_rope_theta(hf),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # HF default for all three
            dtype=dt,
            param_dtype=dt,
            mask_token_id=None if mask_token_id is None else int(mask_token_id),
            block_size=None if block_size is None else int(block_size),
            family=family,
        )
    except ConfigError as e:
        raise HFFormatError(f"config.json does not give a valid model: {e}") from None


def model_config_to_hf_config(cfg: ModelConfig, *, dtype: str | None = None, max_position_embeddings: int | None = None,
                              bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A transformers-5 ``config.json`` dict that ``AutoModelForCausalLM`` loads without custom code.

    TiDAR fields ``mask_token_id`` and ``block_size`` are recorded at top level (transformers keeps unknown keys).
    """
    family = cfg.family
    arch, model_type = ARCHITECTURES[family]
    if family == "qwen2" and (not cfg.qkv_bias or cfg.qk_norm):
        raise HFFormatError("family 'qwen2' needs qkv_bias=True and qk_norm=False (Qwen2 always has q/k/v biases)")
    if family == "qwen3" and (cfg.qkv_bias or not cfg.qk_norm):
        raise HFFormatError("family 'qwen3' needs qk_norm=True and qkv_bias=False")
    if family == "llama" and (cfg.qkv_bias or cfg.qk_norm):
        raise HFFormatError("family 'llama' needs qkv_bias=False and qk_norm=False "
                            "(use family 'qwen2' for q/k/v biases, 'qwen3' for q/k norms)")
    if family == "qwen2" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise HFFormatError(f"family 'qwen2' needs head_dim*num_heads == hidden_size "
                            f"({cfg.head_dim}*{cfg.num_heads} != {cfg.hidden_size}); Qwen2 has no head_dim field")
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": int(max_position_embeddings or _DEFAULT_MAX_POSITIONS[family]),
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": dtype or cfg.param_dtype,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        # TiDAR fields (read back by load_hf_dir; a TiDAR server such as the authors' SGLang worker can use them)
        "mask_token_id": cfg.mask_token_id,
        "block_size": cfg.block_size,
    }
    if family != "qwen2":
        out["head_dim"] = cfg.head_dim
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
        out["pretraining_tp"] = 1
    else:
        out["use_sliding_window"] = False
        out["sliding_window"] = None
        out["max_window_layers"] = cfg.num_layers
        out["layer_types"] = ["full_attention"] * cfg.num_layers
    out.update(extra or {})
    return out
