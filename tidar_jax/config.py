"""Model configuration: one frozen, validated dataclass for the Qwen2/Qwen2.5, Qwen3 and Llama families."""

from __future__ import annotations

import dataclasses
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16", "float64")
# The names a user may give (jax-free, for command lines); what "auto" means per backend is decided in
# tidar_jax.attention.choice. Training attention (model.attention) and decode cache attention (how a decode step
# reads the KV cache).
ATTENTION_KERNELS = ("auto", "reference", "blockwise", "splash", "cudnn", "pallas_gpu")
CACHE_ATTENTION = ("auto", "paged", "fused", "tpu", "dense")


QWEN_MASK_TOKEN_ID = 151662  # <|fim_pad|> in the Qwen2.5/Qwen3 tokenizers, what the released TiDAR code uses


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


# The TiDAR block size B (draft length) when nothing names one: 16, the paper's released models' (a model config
# without the field, decoding options, the plans, TiDAR training from an HF checkpoint that records none). Loading
# never assumes it: a checkpoint with no record has no trained block size.
DEFAULT_BLOCK_SIZE = 16


def check_block_size(value, name: str = "model.block_size", error: type[Exception] = ConfigError) -> int:
    """The one rule for a TiDAR block size B (the draft length): an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"{name}={value!r}: must be an integer >= 1")
    return value


def resolve_mask_token(explicit: int | None, recorded: int | None, *, vocab_size: int, qwen: bool = False) -> int | None:
    """The [MASK] id, decided once before any ``ModelConfig`` is built: ``explicit`` (a CLI flag, the YAML) >
    ``recorded`` (the checkpoint's or the data manifest's) > 151662 (``<|fim_pad|>``) for a Qwen vocabulary
    (``qwen`` and vocab_size > 151662). None when no rule applies (the caller names its own remedies)."""
    for value in (explicit, recorded):
        if value is not None:
            return int(value)
    if qwen and vocab_size > QWEN_MASK_TOKEN_ID:
        return QWEN_MASK_TOKEN_ID
    return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer plus the TiDAR fields.

    Families: Qwen2/Qwen2.5 (``qkv_bias=True``), Qwen3 (``qk_norm=True``, explicit ``head_dim``), Llama.
    ``mask_token_id`` is an existing vocabulary id reused as [MASK] (Qwen: 151662 ``<|fim_pad|>``); None for a
    stock checkpoint that has none (it decodes AR; TiDAR training and decoding need one, docs/hf.md).
    """

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_heads
    mlp_size: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"  # activation/compute dtype
    param_dtype: str = "float32"
    mask_token_id: int | None = 511
    # the block size the weights were (or are being) trained with: the one record of it; None = an AR-only model
    block_size: int | None = DEFAULT_BLOCK_SIZE
    family: str = "llama"  # "qwen2" | "qwen3" | "llama": informational, used by HF export
    attention: str = "auto"  # attention kernel: one of ATTENTION_KERNELS (a runtime choice, not architecture)

    def __post_init__(self):
        _check_fields(self, object.__setattr__)
        _check_mask_token(self)

    @property
    def num_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * self.mlp_size + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_fields(c, set_attr) -> None:
    """Every field rule except the [MASK] id's (which needs the resolved id)."""
    def positive(name):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.{name}={value!r}: must be an integer >= 1")

    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_size"):
        positive(name)
    if c.block_size is not None:
        check_block_size(c.block_size)
    if c.head_dim is None:
        if c.hidden_size % c.num_heads:
            raise ConfigError(
                f"model.num_heads={c.num_heads}: must divide hidden_size={c.hidden_size} "
                "(or set head_dim explicitly)")
        set_attr(c, "head_dim", c.hidden_size // c.num_heads)
    positive("head_dim")
    if c.head_dim % 2:
        raise ConfigError(f"model.head_dim={c.head_dim}: must be even (rotary embedding rotates halves)")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={c.num_kv_heads}: must divide num_heads={c.num_heads} (GQA groups)")
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in _DTYPES:
            raise ConfigError(f"model.{name}={getattr(c, name)!r}: must be one of {', '.join(_DTYPES)}")
    if not c.rope_theta > 0:
        raise ConfigError(f"model.rope_theta={c.rope_theta!r}: must be > 0")
    if not c.rms_eps > 0:
        raise ConfigError(f"model.rms_eps={c.rms_eps!r}: must be > 0")
    if c.family not in ("qwen2", "qwen3", "llama"):
        raise ConfigError(f"model.family={c.family!r}: must be one of qwen2, qwen3, llama")
    if c.attention not in ATTENTION_KERNELS:
        raise ConfigError(f"model.attention={c.attention!r}: must be one of {', '.join(ATTENTION_KERNELS)}")


def _check_mask_token(c) -> None:
    if c.mask_token_id is None:
        return
    if not isinstance(c.mask_token_id, int) or not 0 <= c.mask_token_id < c.vocab_size:
        raise ConfigError(
            f"model.mask_token_id={c.mask_token_id!r}: must be a token id in [0, vocab_size={c.vocab_size})")


def check_architecture(arch: dict) -> None:
    """Check the ``ModelConfig`` fields of ``arch`` (YAML keys) before the [MASK] id is resolved: the same rules
    as ``ModelConfig``, the [MASK] id's only when ``arch`` gives one."""
    import types

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ConfigError(f"unknown model config key(s) {unknown}; allowed: {sorted(known)}")
    values = types.SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(ModelConfig)})
    for k, v in arch.items():
        setattr(values, k, v)
    _check_fields(values, setattr)
    if values.mask_token_id is not None:
        _check_mask_token(values)
