"""Tensor-parallel decoding: the weights sharded over the tensor axis (attention heads / KV heads, MLP columns,
vocabulary; ``tidar_jax.sharding.LOGICAL_AXIS_RULES``), the cache by KV head, the cache kernel in a ``shard_map``.
On fake CPU devices greedy TiDAR equals greedy AR; compiled for a TPU v5e-4 slice (deviceless) the decode steps
have no loop and each chip takes about a quarter of the weights."""

from __future__ import annotations

import jax
import pytest

from test_decode_support import pattern_prompts, trained_decoder, trained_tiny
from tidar_jax.attention import tpu_cache
from tidar_jax.decode import Decoder
from tidar_jax.sharding import make_mesh

PROMPTS = pattern_prompts([5, 2, 9, 12], seed=13)


@pytest.mark.parametrize("shape", [(2, 1, 4), pytest.param((4, 1, 2), marks=pytest.mark.slow)])
def test_tensor_parallel_tidar_equals_ar(shape):
    """The tiny model's 4 query / 2 KV heads over tensor=4: one query head per device, KV heads replicated
    ("within_kv"); over tensor=2 the KV heads are split too ("kv"). The TPU kernel runs in Pallas interpret
    mode inside the shard_map; rows over the data axis."""
    with jax.enable_x64(True):
        mesh = make_mesh(*shape)
        cfg = trained_tiny("float64").cfg
        assert tpu_cache.shard_plan(mesh, len(PROMPTS), cfg.num_heads, cfg.num_kv_heads)["heads"] == (
            "within_kv" if shape[2] == 4 else "kv")
        ar = trained_decoder("float64").generate(PROMPTS, mode="ar", max_new_tokens=12).tokens
        tp = Decoder.from_model(trained_tiny("float64"), mesh=mesh)
        out = tp.generate(PROMPTS, mode="tidar", block_size=4, max_new_tokens=12, cache_attention="tpu")
        assert out.tokens == ar
        assert out.stats["mean_accepted"] > 1  # drafts were accepted: the step's own block is exercised



@pytest.mark.parametrize("mode", ["ar", pytest.param("tidar", marks=pytest.mark.slow)])
def test_tensor_parallel_v5e4_step_has_no_loop_and_a_quarter_of_the_weights(v5e_devices, mode):
    """A small model (12 query / 4 KV heads of 128: 3 query heads per chip, as the 1.5B model's 12 / 2 heads
    give) on a v5e-4 slice with tensor=4, ``cache_attention="auto"`` (the TPU kernel): the compiled step has no
    ``while`` loop, runs the kernel once per layer, each chip's program takes a quarter of the weights (within
    5%: norms are replicated), and copies no weight (``model.tpu_step``: the 2-D reshape of a 3-head query
    weight is a relayout copy on TPU)."""
    from tidar_jax.analysis.decode_plan import compile_decode
    from tidar_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=1024, hidden_size=512, num_layers=2, num_heads=12, num_kv_heads=4, head_dim=128,
                      mlp_size=1024, dtype="bfloat16", param_dtype="bfloat16", mask_token_id=1, block_size=4)
    prog = compile_decode(cfg, v5e_devices, batch=1, block_size=4, context=256, max_new_tokens=32, modes=(mode,),
                          mesh_shape=(1, 1, 4), with_prefill=False)[f"{mode} step"]
    assert prog.program.loops() == []
    kernels = [k for k in prog.program.kernels() if "tpu_cache_attention" in k.attrs]
    assert len(kernels) == cfg.num_layers
    assert 0.95 <= 4 * prog.weight_bytes_per_device / prog.weight_bytes <= 1.05, (prog.weight_bytes_per_device,
                                                                                  prog.weight_bytes)
    # a ``copy`` of a weight is a relayout in HBM every step (``copy-start``s are the memory-space assignment's
    # prefetches into VMEM); XLA names the parameter it copies in the op's metadata
    copies = [k.name for k in prog.program.kernels() if k.opcode == "copy" and 'op_name="params.' in k.attrs]
    assert copies == [], copies
