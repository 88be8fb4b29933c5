"""tidar_jax: TiDAR (Think in Diffusion, Talk in Autoregression) in JAX/Flax."""

from tidar_jax.config import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "__version__"]
