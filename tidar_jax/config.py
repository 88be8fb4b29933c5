"""Model configuration: one frozen, validated dataclass for the Qwen2/Qwen2.5, Qwen3 and Llama families."""

from __future__ import annotations

import dataclasses
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16", "float64")
# attention kernels (tidar_jax.attention); "auto" picks per backend: blockwise on CPU/GPU, splash on TPU
ATTENTION_KERNELS = ("auto", "reference", "blockwise", "splash", "cudnn")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer plus the TiDAR fields.

    Families: Qwen2/Qwen2.5 (``qkv_bias=True``), Qwen3 (``qk_norm=True``, explicit ``head_dim``), Llama.
    ``mask_token_id`` is an existing vocabulary id reused as [MASK] (Qwen: 151662 ``<|fim_pad|>``).
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
    mask_token_id: int = 511
    block_size: int = 4
    family: str = "llama"  # "qwen2" | "qwen3" | "llama": informational, used by HF export
    attention: str = "auto"  # attention kernel: one of ATTENTION_KERNELS (a runtime choice, not architecture)

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name}={value!r}: must be an integer >= 1")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_size"):
            positive(name)
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ConfigError(f"model.block_size={self.block_size!r}: must be an integer >= 1")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model.num_heads={self.num_heads}: must divide hidden_size={self.hidden_size} "
                    "(or set head_dim explicitly)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        positive("head_dim")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim}: must be even (rotary embedding rotates halves)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads}: must divide num_heads={self.num_heads} (GQA groups)")
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"model.mask_token_id={self.mask_token_id!r}: must be a token id in [0, vocab_size={self.vocab_size})")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: must be one of {', '.join(_DTYPES)}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta!r}: must be > 0")
        if not self.rms_eps > 0:
            raise ConfigError(f"model.rms_eps={self.rms_eps!r}: must be > 0")
        if self.family not in ("qwen2", "qwen3", "llama"):
            raise ConfigError(f"model.family={self.family!r}: must be one of qwen2, qwen3, llama")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention={self.attention!r}: must be one of {', '.join(ATTENTION_KERNELS)}")

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
