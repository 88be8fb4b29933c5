"""Training FLOPs per step: an analytic matmul count, and the compiled step's own count (XLA cost analysis).

Equal-compute comparisons (``benchmarks/fidelity.py``) give every variant the same FLOPs budget; a TiDAR step runs
the doubled ``[clean | mask]`` sequence (2S tokens, a 2S x 2S attention, the LM head at 2S rows), so it gets fewer
steps than an AR step.
"""

from __future__ import annotations

from tidar_jax.config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, tokens: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward over ``batch`` rows of ``tokens`` tokens with a dense
    ``tokens x tokens`` attention (every score computed, as the reference kernel does), LM head at every row."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_token_layer = 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * cfg.mlp_size
    attention_layer = 2 * 2 * tokens * tokens * q  # scores and the weighted sum of values, per row
    per_row = cfg.num_layers * (tokens * per_token_layer + attention_layer) + tokens * 2 * d * cfg.vocab_size
    return float(batch * per_row)


def train_step_flops(cfg: ModelConfig, batch: int, seq_len: int, objective: str = "tidar") -> float:
    """Forward + backward (2x forward) matmul FLOPs of one train step; TiDAR runs 2S tokens, AR runs S."""
    if objective not in ("tidar", "ar"):
        raise ValueError(f"objective={objective!r}: must be one of tidar, ar")
    tokens = 2 * seq_len if objective == "tidar" else seq_len
    return 3.0 * forward_flops(cfg, batch, tokens)


def compiled_flops(jitted, *args) -> float | None:
    """FLOPs of ``jitted(*args)`` from XLA's cost analysis of the compiled program (None when the backend has
    none). ``args`` may be abstract (``jax.ShapeDtypeStruct``)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def attended_pairs(seq_len: int, block_size: int, objective: str = "tidar") -> int:
    """Query-key pairs the training mask allows per sequence (one document): AR causal S(S+1)/2; TiDAR adds, for
    mask block b, its own block (B x B) and the bB clean keys before it: S(S+1)/2 + S(S-B)/2 + S B."""
    s, b = seq_len, block_size
    causal = s * (s + 1) // 2
    if objective == "ar":
        return causal
    return causal + s * (s - b) // 2 + s * b


def model_flops(cfg: ModelConfig, batch: int, seq_len: int, objective: str = "tidar") -> float:
    """The model FLOPs of one train step that MFU divides: forward + backward (3x forward) of the matmuls, with
    attention counted at the pairs the mask allows (not the dense square, not the tiles a kernel happens to
    compute, and no rematerialisation)."""
    tokens = 2 * seq_len if objective == "tidar" else seq_len
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_token_layer = 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * cfg.mlp_size
    attention_layer = 2 * 2 * attended_pairs(seq_len, cfg.block_size or 1, objective) * q
    per_row = cfg.num_layers * (tokens * per_token_layer + attention_layer) + tokens * 2 * d * cfg.vocab_size
    return 3.0 * batch * per_row
