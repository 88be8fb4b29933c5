"""Hugging Face interop: import Qwen2/Qwen2.5/Qwen3/Llama safetensors directories, export loadable ones.

One key table (``tidar_jax.hf.keys.KEY_TABLE``) drives both directions; ``config.json`` maps both ways in
``tidar_jax.hf.hf_config``.
"""

from tidar_jax.config import QWEN_MASK_TOKEN_ID
from tidar_jax.hf.export import export_hf
from tidar_jax.hf.hf_config import DEFAULT_BLOCK_SIZE, hf_config_to_model_config, model_config_to_hf_config
from tidar_jax.hf.keys import KEY_TABLE, HFFormatError, bound_keys
from tidar_jax.hf.load import is_hf_dir, load_hf_dir, params_from_tensors

__all__ = ["DEFAULT_BLOCK_SIZE", "KEY_TABLE", "QWEN_MASK_TOKEN_ID", "HFFormatError", "bound_keys", "export_hf",
           "hf_config_to_model_config", "is_hf_dir", "load_hf_dir", "model_config_to_hf_config",
           "params_from_tensors"]
