"""The decoder-only transformer (Qwen2/Qwen3/Llama families) used for both AR and diffusion outputs.

One model, one LM head: whether a position yields AR or diffusion logits depends only on its input token
(clean or [MASK]) and on the attention mask given by the caller (see ``tidar_jax.masks``).

Shape letters
-------------
Array names end in one capital letter per axis (``logits_NTV`` is ``[N, T, V]``); this table is the one place the
letters are defined, and every name in ``tidar_jax/``, ``benchmarks/`` and ``tests/`` uses them with these
meanings only. A digit is a literal size (``token_N1``, ``spans_Z2``) and ``2S`` is the doubled training sequence
(``tokens_N2S``: S clean tokens, then S [MASK] tokens). Lowercase letters inside a suffix are per-kernel tile
indices (``s_NKRqk`` in the blockwise kernel).

====  =========================================================================================================
A     accepted-count bins 0..B of a decode step (``accept_hist_A``, size B+1)
B     TiDAR block size: drafts per step, slots of one block or of one decode mask group (``drafts_NB``)
C     KV-cache slots (``k_LNCKD``)
D     attention head dim (``q_NTHD``; also RoPE tables ``cos_NTD``)
E     model (embedding) width, logical axis ``"embed"`` (``x_NTE``, ``hidden_NTE``, LM head ``w_EV``)
F     rotary frequencies, head_dim / 2 (``freqs_NTF``)
G     mask groups of a decode step (``group_argmax_NGB``, ``counts_G``)
H     query heads
I     EOS-id slots (``Stops.eos_I``)
J     a block's draft positions after the first, B-1 of them (``u_accept_NJ``; draft-chain metric ``v_NOJ``)
K     key/value heads
L     layers (``KVCache.k_LNCKD``)
M     decode output buffer length (``out_NM``)
N     batch rows: sequences of a batch, decode rows (``length_N``)
O     blocks of a training sequence, S / B (draft-chain metric ``v_NOJ``)
P     prompt positions, padded prompt (``prompt_NP``)
Q     stop sequences (``Stops.stop_QW``, ``stop_len_Q``)
R     query heads per key/value head, GQA repeats: H = K·R (``q_NTKRD``, ``m_NKRT``)
S     key positions of attention / training sequence length (``mask_NTS``, ``tokens_NS``)
T     query tokens of one forward, the current tokens (``tokens_NT``; a decode step's B(B+1) tokens)
U     micro-batches of gradient accumulation (``micro_UNS``)
V     vocabulary
W     stop-window tokens (``Stops.stop_QW``)
X     rows a helper works on, whatever they came from: merged leading axes in the sampling helpers
      (``probs_XV``), the positions the LM head reads (``idx_NX``)
Y     slots of one cache page, paged attention (``k_NYKD``)
Z     documents of a token stream (``spans_Z2``, packing)
====  =========================================================================================================

Not array names, kept as they are because they are JSON keys or printed labels of benchmark results:
``params_M`` (millions of parameters), ``Q=`` / ``fwd_Q1`` (query tokens per forward) and ``step_B1``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.model import gpu_step
from tidar_jax.model.gpu_step import PLAIN, GpuStep
from tidar_jax.model.layers import MLP, Attention, LayerCache, RMSNorm, _normal, param, rope_tables
from tidar_jax.model.remat import policy_name, rematerialize
from tidar_jax.scan_options import scan_unroll
from tidar_jax.sharding import constrain

LAYERS_AXIS = "layers"
LAYERS_KEY = "layers"  # the params subtree of the stacked decoder layers (the attribute below)
ACTIVATION_AXES = ("batch", "length", "embed")


class KVCache(NamedTuple):
    """Committed keys/values, ``[L, N, C, K, D]`` (layers, batch rows, cache slots, kv heads, head dim), plus the
    per-row lengths ``[N]``."""

    k_LNCKD: jax.Array
    v_LNCKD: jax.Array
    length_N: jax.Array  # number of committed (visible) slots per row

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, cache_size: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        shape = (cfg.num_layers, batch, cache_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class StepKV(NamedTuple):
    """Keys/values of the current tokens of one forward, ``[L, N, T, K, D]``."""

    k_LNTKD: jax.Array
    v_LNTKD: jax.Array


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_NTE, cos, sin, mask_NTS, cache: LayerCache | None = None, step: GpuStep = PLAIN):
        if step.defer_norms:
            xs_NTE, r_NT1 = self.attn_norm.deferred(x_NTE)
            attn_out, k, v = self.attn(xs_NTE, cos, sin, mask_NTS, cache, r_NT1, step)
            x_NTE = x_NTE + attn_out
            return x_NTE + self.mlp(*self.mlp_norm.deferred(x_NTE)), k, v
        attn_out, k, v = self.attn(self.attn_norm(x_NTE), cos, sin, mask_NTS, cache, step=step)
        x_NTE = x_NTE + attn_out
        x_NTE = x_NTE + self.mlp(self.mlp_norm(x_NTE))
        return x_NTE, k, v


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One ``DecoderLayer`` whose every parameter has a leading ``layers`` axis (layer i at index i)."""
    graphdef, first = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *[nnx.split(lyr)[1] for lyr in layers[1:]])

    def tag(var):
        var.set_metadata("logical_axes", (LAYERS_AXIS,) + tuple(var.get_metadata()["logical_axes"]))
        return var

    stacked = jax.tree.map(tag, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Embedding, ``num_layers`` decoder layers applied by ``lax.scan`` over stacked parameters, final norm, head.

    ``remat``: a policy name of ``tidar_jax.model.remat`` (or the old booleans) applied to each scanned layer.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, remat: bool | str = False):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.remat = policy_name(remat)
        self.embed = param(rngs, _normal(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        # built one by one (layer i draws its weights i-th from the seed's stream), then stacked
        self.layers = stack_layers([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, _normal(0.02), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def hidden(self, tokens_NT, positions_NT, mask_NTS, cache: KVCache | None = None, layer_states=None):
        """Final-normed hidden states ``[N, T, E]`` and the current tokens' K/V (``StepKV``).

        ``mask_NTS`` is a ``tidar_jax.masks`` layout or a dense boolean mask over keys ``[cache slots 0..C-1 |
        current tokens]`` (just the current tokens when ``cache`` is None); it is passed through, unchanged, to every
        scanned layer. The cache is read, never written: committing K/V is the caller's decision.
        ``layer_states``: one state per layer (``tidar_jax.model.layer_major``) to run instead of the stacked
        layers, as straight-line code (decoding: no per-layer slice of a stacked weight is materialised).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x_NTE = jnp.take(self.embed[...], tokens_NT, axis=0).astype(dt)
        cos, sin = rope_tables(positions_NT, cfg.head_dim, cfg.rope_theta, dt)
        layer_graphdef, layer_state = nnx.split(self.layers)
        step = gpu_step.for_forward(reads_cache=cache is not None)  # the lean GPU decode step, decided once

        def one_layer(x_NTE, xs):
            # the mask (possibly an opaque layout object), cos, sin and the whole cache are closed over: the same
            # for every layer (the cache is indexed by layer inside attention, never sliced out by the scan)
            state, layer_index = xs
            layer = nnx.merge(layer_graphdef, state)
            layer_cache = None if cache is None else LayerCache(cache.k_LNCKD, cache.v_LNCKD, layer_index)
            x_NTE = constrain(x_NTE, ACTIVATION_AXES, "layer input activations")
            x_NTE, k_NTKD, v_NTKD = layer(x_NTE, cos, sin, mask_NTS, layer_cache, step)
            return x_NTE, (k_NTKD, v_NTKD)

        t = x_NTE.shape[1]
        x_NTE = jnp.pad(x_NTE, ((0, 0), (0, gpu_step.pad_rows(step, x_NTE)), (0, 0)))
        if layer_states is not None:
            kv = []
            for i, state in enumerate(layer_states):
                x_NTE, kv_i = one_layer(x_NTE, (state, jnp.int32(i)))
                kv.append(kv_i)
            k_LNTKD, v_LNTKD = (jnp.stack(a) for a in zip(*kv))
        else:
            layer_index_L = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            x_NTE, (k_LNTKD, v_LNTKD) = jax.lax.scan(rematerialize(one_layer, self.remat), x_NTE,
                                                     (layer_state, layer_index_L), unroll=scan_unroll())
        x_NTE = constrain(x_NTE[:, :t], ACTIVATION_AXES, "final activations")
        return self.final_norm(x_NTE), StepKV(k_LNTKD, v_LNTKD)

    def logits(self, hidden_NTE):
        """LM-head logits (float32 or wider) for the given hidden states; call it only where logits are needed."""
        dt = hidden_NTE.dtype
        if self.cfg.tie_embeddings:
            w_EV = self.embed[...].astype(dt).T
        else:
            w_EV = self.lm_head[...].astype(dt)
        out = jnp.promote_types(dt, jnp.float32)
        return jnp.einsum("nte,ev->ntv", hidden_NTE, w_EV, preferred_element_type=out)

    def __call__(self, tokens_NT, positions_NT, mask_NTS, cache: KVCache | None = None):
        hidden_NTE, step_kv = self.hidden(tokens_NT, positions_NT, mask_NTS, cache)
        return self.logits(hidden_NTE), step_kv


def causal_mask(batch: int, length: int):
    """Plain causal boolean mask ``[N, T, T]``."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool))[None], (batch, length, length))


def init_model(cfg: ModelConfig, seed: int = 0, remat: bool | str = False) -> Transformer:
    return Transformer(cfg, nnx.Rngs(params=seed), remat=remat)
