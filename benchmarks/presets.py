"""Random-init model presets of the benchmarks, by name (jax-free, so the command line can list them)."""

from __future__ import annotations

from typing import Any

# Random-init models used when no checkpoint is given. "m38" is the 38.7M-parameter model of
# shared/reference/environment.md section 8, so numbers can be compared with that table.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=64,
                 mask_token_id=1, block_size=4),
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_size=768,
                  mask_token_id=1, block_size=8, family="qwen2", qkv_bias=True),
    "m38": dict(vocab_size=32000, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, mlp_size=1536,
                tie_embeddings=False, mask_token_id=1, block_size=8, family="qwen2", qkv_bias=True),
}
