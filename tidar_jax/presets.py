"""Model shapes by name: the real architectures the plans compile (``decode.py --plan --preset``, the GPU cost
report) and the small random-init models of the benchmarks. One owner, jax-free, so a command line can list them
before jax initialises; ``benchmarks/presets.py`` re-exports ``PRESETS``.

The real shapes are the architectures of the released checkpoints (their ``config.json``), with the TiDAR fields
(block size 16, the Qwen [MASK] id 151662); configs/qwen2.5-1.5b-tidar.yaml and configs/qwen3-8b-tidar.yaml carry
the same architecture (tests/test_decode_plan.py checks that they agree).
"""

from __future__ import annotations

from typing import Any

from tidar_jax.config import QWEN_MASK_TOKEN_ID

# The architectures TiDAR was trained from (arXiv 2511.08923 §4.1): Qwen2.5-1.5B and Qwen3-8B; and Qwen2.5-0.5B,
# the smallest real shape the benchmarks time.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_size=4864, qkv_bias=True, tie_embeddings=True,
                         rope_theta=1e6, rms_eps=1e-6, block_size=16, mask_token_id=QWEN_MASK_TOKEN_ID),
    "qwen2.5-1.5b": dict(family="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12,
                         num_kv_heads=2, mlp_size=8960, qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
                         rms_eps=1e-6, block_size=16, mask_token_id=QWEN_MASK_TOKEN_ID),
    "qwen3-8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
                     num_kv_heads=8, head_dim=128, mlp_size=12288, qk_norm=True, tie_embeddings=False,
                     rope_theta=1e6, rms_eps=1e-6, block_size=16, mask_token_id=QWEN_MASK_TOKEN_ID),
}

# The paper's decode results for those shapes (arXiv 2511.08923 Table 2 / §4.2): tokens per forward (T/NFE) at
# B=16 and the measured tokens/s speedup over the AR base model, batch 1.
PAPER_DECODE: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {"tokens_per_nfe": 7.45, "speedup": 4.71, "block_size": 16, "paper_model": "TiDAR 1.5B"},
    "qwen3-8b": {"tokens_per_nfe": 8.25, "speedup": 5.91, "block_size": 16, "paper_model": "TiDAR 8B"},
}

# Random-init models used by the benchmarks when no checkpoint is given. "m38" is the 38.7M-parameter model of
# the reference environment's CPU timing table (its section 8), so numbers can be compared with that table.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=64,
                 mask_token_id=1, block_size=4),
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_size=768,
                  mask_token_id=1, block_size=8, family="qwen2", qkv_bias=True),
    "m38": dict(vocab_size=32000, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, mlp_size=1536,
                tie_embeddings=False, mask_token_id=1, block_size=8, family="qwen2", qkv_bias=True),
    **MODEL_SHAPES,
}
