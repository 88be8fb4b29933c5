"""The one key table between Hugging Face state-dict names and our parameter paths, used in both directions.

Every entry says: HF name, our path (both with ``{i}`` for the layer index), the HF shape and our shape as
functions of ``ModelConfig``, and whether the HF tensor is transposed before being reshaped into ours. torch
``nn.Linear`` stores ``W[out, in]`` (``y = x @ W.T``); we store ``[in, ...out]`` (``y = x @ W``), so linear weights
transpose, and the head axes are then split out (``[D, H*hd] -> [D, H, hd]``) by a reshape.

    import:  ours = reshape(transpose?(hf), our_shape)
    export:  hf   = transpose?(reshape(ours, hf_shape_before_transpose))

Both directions are exact (no arithmetic), so tensors round-trip bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from tidar_jax.config import ModelConfig

Shape = tuple[int, ...]


class HFFormatError(ValueError):
    """A Hugging Face directory, config or tensor cannot be used; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str  # HF state-dict name, "{i}" = layer index
    ours: str  # dotted path in our nnx state, "{i}" = layer index
    hf_shape: Callable[[ModelConfig], Shape]
    our_shape: Callable[[ModelConfig], Shape]
    transpose: bool  # HF tensor is [out, in] of a torch Linear
    when: Callable[[ModelConfig], bool] = lambda cfg: True  # present only for some configs
    per_layer: bool = True


def _d(c): return c.hidden_size
def _qd(c): return c.num_heads * c.head_dim
def _kvd(c): return c.num_kv_heads * c.head_dim


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
_LAYER = "layers.{i}."

KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "embed", lambda c: (c.vocab_size, _d(c)),
            lambda c: (c.vocab_size, _d(c)), False, per_layer=False),
    KeyRule("model.layers.{i}.input_layernorm.weight", _LAYER + "attn_norm.scale", lambda c: (_d(c),),
            lambda c: (_d(c),), False),
    KeyRule(_ATTN + "q_proj.weight", _LAYER + "attn.q_proj", lambda c: (_qd(c), _d(c)),
            lambda c: (_d(c), c.num_heads, c.head_dim), True),
    KeyRule(_ATTN + "k_proj.weight", _LAYER + "attn.k_proj", lambda c: (_kvd(c), _d(c)),
            lambda c: (_d(c), c.num_kv_heads, c.head_dim), True),
    KeyRule(_ATTN + "v_proj.weight", _LAYER + "attn.v_proj", lambda c: (_kvd(c), _d(c)),
            lambda c: (_d(c), c.num_kv_heads, c.head_dim), True),
    KeyRule(_ATTN + "o_proj.weight", _LAYER + "attn.o_proj", lambda c: (_d(c), _qd(c)),
            lambda c: (c.num_heads, c.head_dim, _d(c)), True),
    KeyRule(_ATTN + "q_proj.bias", _LAYER + "attn.q_bias", lambda c: (_qd(c),),
            lambda c: (c.num_heads, c.head_dim), False, when=lambda c: c.qkv_bias),
    KeyRule(_ATTN + "k_proj.bias", _LAYER + "attn.k_bias", lambda c: (_kvd(c),),
            lambda c: (c.num_kv_heads, c.head_dim), False, when=lambda c: c.qkv_bias),
    KeyRule(_ATTN + "v_proj.bias", _LAYER + "attn.v_bias", lambda c: (_kvd(c),),
            lambda c: (c.num_kv_heads, c.head_dim), False, when=lambda c: c.qkv_bias),
    KeyRule(_ATTN + "q_norm.weight", _LAYER + "attn.q_norm.scale", lambda c: (c.head_dim,),
            lambda c: (c.head_dim,), False, when=lambda c: c.qk_norm),
    KeyRule(_ATTN + "k_norm.weight", _LAYER + "attn.k_norm.scale", lambda c: (c.head_dim,),
            lambda c: (c.head_dim,), False, when=lambda c: c.qk_norm),
    KeyRule("model.layers.{i}.post_attention_layernorm.weight", _LAYER + "mlp_norm.scale", lambda c: (_d(c),),
            lambda c: (_d(c),), False),
    KeyRule(_MLP + "gate_proj.weight", _LAYER + "mlp.gate_proj", lambda c: (c.mlp_size, _d(c)),
            lambda c: (_d(c), c.mlp_size), True),
    KeyRule(_MLP + "up_proj.weight", _LAYER + "mlp.up_proj", lambda c: (c.mlp_size, _d(c)),
            lambda c: (_d(c), c.mlp_size), True),
    KeyRule(_MLP + "down_proj.weight", _LAYER + "mlp.down_proj", lambda c: (_d(c), c.mlp_size),
            lambda c: (c.mlp_size, _d(c)), True),
    KeyRule("model.norm.weight", "final_norm.scale", lambda c: (_d(c),), lambda c: (_d(c),), False,
            per_layer=False),
    KeyRule("lm_head.weight", "lm_head", lambda c: (c.vocab_size, _d(c)), lambda c: (_d(c), c.vocab_size), True,
            when=lambda c: not c.tie_embeddings, per_layer=False),
)


@dataclasses.dataclass(frozen=True)
class BoundKey:
    """One concrete tensor: a rule with its layer index filled in.

    ``our_path`` names the tensor (``("layers", i, "attn", "q_proj")``); our parameters keep the layers stacked,
    so it lives at index ``layer`` of the leading axis of the parameter at ``param_path`` (``our_path`` without
    the index). Layerless tensors have ``layer=None`` and ``param_path == our_path``.
    """

    rule: KeyRule
    hf_name: str
    our_path: tuple[str | int, ...]
    hf_shape: Shape
    our_shape: Shape

    @property
    def layer(self) -> int | None:
        return self.our_path[1] if self.rule.per_layer else None

    @property
    def param_path(self) -> tuple[str | int, ...]:
        return self.our_path[:1] + self.our_path[2:] if self.rule.per_layer else self.our_path

    def get_ours(self, params):
        """This tensor from a (stacked) params tree: the layer's slice of the stacked parameter."""
        leaf = get_path(params, self.param_path)
        return leaf if self.layer is None else leaf[self.layer]

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        if tuple(hf_array.shape) != self.hf_shape:
            raise HFFormatError(
                f"tensor {self.hf_name} has shape {tuple(hf_array.shape)} but the config implies {self.hf_shape}")
        x = hf_array.T if self.rule.transpose else hf_array
        return np.ascontiguousarray(x.reshape(self.our_shape))

    def to_hf(self, our_array: np.ndarray) -> np.ndarray:
        if tuple(our_array.shape) != self.our_shape:
            raise HFFormatError(
                f"parameter {'.'.join(map(str, self.our_path))} has shape {tuple(our_array.shape)} but the config "
                f"implies {self.our_shape}")
        if self.rule.transpose:
            return np.ascontiguousarray(our_array.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(our_array.reshape(self.hf_shape))


def _path(template: str, i: int | None) -> tuple[str | int, ...]:
    parts = template.format(i=i).split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def bound_keys(cfg: ModelConfig) -> Iterator[BoundKey]:
    """Every tensor the config implies, in a stable order (embedding, layer 0.., final norm, head)."""
    layerless = [r for r in KEY_TABLE if not r.per_layer]
    per_layer = [r for r in KEY_TABLE if r.per_layer]
    order = [(layerless[0], None)]
    order += [(r, i) for i in range(cfg.num_layers) for r in per_layer]
    order += [(r, None) for r in layerless[1:]]
    for rule, i in order:
        if not rule.when(cfg):
            continue
        yield BoundKey(rule, rule.hf.format(i=i), _path(rule.ours, i), tuple(rule.hf_shape(cfg)),
                       tuple(rule.our_shape(cfg)))


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
