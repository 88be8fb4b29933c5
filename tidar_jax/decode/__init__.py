"""TiDAR decoding (and the AR baseline) with a fixed-size KV cache, in one jitted ``while_loop``."""

from tidar_jax.decode.api import Decoder, DecodeStream, GenerateResult, generate, prompt_bucket
from tidar_jax.decode.options import DecodeError, DecodeOptions

__all__ = ["Decoder", "DecodeStream", "GenerateResult", "generate", "prompt_bucket", "DecodeError",
           "DecodeOptions"]
