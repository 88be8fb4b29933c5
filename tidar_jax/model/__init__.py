from tidar_jax.model.transformer import KVCache, StepKV, Transformer, causal_mask, init_model
from tidar_jax.model.functional import abstract_model, apply, create_sharded, split

__all__ = ["KVCache", "StepKV", "Transformer", "causal_mask", "init_model", "abstract_model", "apply",
           "create_sharded", "split"]
