"""What every checkpoint loader returns: enough to run the model for inference."""

from __future__ import annotations

import dataclasses
from typing import Any

from tidar_jax.config import ModelConfig


@dataclasses.dataclass
class InferenceBundle:
    """``config.block_size`` is the block size the weights were trained with (None: an AR-only model, or a
    checkpoint that records none); it is the one record of it."""

    config: ModelConfig
    graphdef: Any
    params: Any  # nnx.State of arrays
    tokenizer: Any = None  # tokenizers.Tokenizer or None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] | None = None  # every EOS id recorded (generation_config.json may list several)
    source: str = ""  # where it was loaded from
    step: int | None = None
