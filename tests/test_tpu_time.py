"""TPU times: XLA:TPU's optimised HLO keeps no loop trip counts; they come from the unoptimised program and reach
the estimate. A small model's TPU decode step (deviceless v5e compile, as ``decode.py --plan`` builds it) gets a
ceiling and an expected time with its loops' trip counts. Needs libtpu (requirements-tpu-compile.txt; CI has it)."""

import pytest

from tidar_jax import targets
from tidar_jax.targets import parse_target


def _v5e(name="v5e-4"):
    target = parse_target(name)
    reason = targets.missing_install(target)
    if reason:
        pytest.skip(reason)
    return target, targets.target_devices(target)


def test_static_trip_counts_reach_the_estimate():
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from tidar_jax.analysis.tpu_time import tpu_time, with_trip_counts
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.hlo import HloProgram

    target, devices = _v5e()

    def f(x, n):
        def body(c, _):  # a data-dependent while inside a static scan
            y = jax.lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] * 1.01 + 1), (0, c))[1]
            return y @ y, None

        x, _ = jax.lax.scan(body, x, None, length=7)
        return jax.lax.fori_loop(0, 5, lambda i, v: jnp.tanh(v @ v), x)

    on = SingleDeviceSharding(devices[0])
    lowered = jax.jit(f).lower(jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=on),
                               jax.ShapeDtypeStruct((), jnp.int32, sharding=on))
    compiled = HloProgram.of(lowered.compile())
    assert all(lp.trip_count is None for lp in compiled.loops())  # what XLA:TPU leaves
    program, loops = with_trip_counts(compiled, lowered.as_text(dialect="hlo"), dynamic_trips=3)
    assert sorted((lp.trips for lp in loops), key=str) == [5, 7, None]
    assert next(lp for lp in loops if lp.trips is None).assumed == 3
    matmul = 2.0 * 256 ** 3
    assert estimate(compiled, target.chip, 1).flops == pytest.approx(2 * matmul)  # one iteration each
    assert estimate(program, target.chip, 3).flops == pytest.approx(12 * matmul)  # 7 + 5 matmuls
    t = tpu_time(compiled, lowered.as_text(dialect="hlo"), target.chip, dynamic_trips=3)
    assert 0 < t.ceiling_s < t.expected_s
    assert "host round trip 20 us" not in t.assumptions_line and "no host round trips" in t.assumptions_line


def test_small_model_tpu_decode_step_gets_a_time_with_its_trip_counts():
    from tidar_jax.analysis.tpu_time import tpu_time
    from tidar_jax.config import ModelConfig
    from tidar_jax.analysis.decode_plan import compile_decode

    target, devices = _v5e()
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128,
                      mlp_size=256, dtype="bfloat16", param_dtype="bfloat16", mask_token_id=1, block_size=4)
    context, page = 256, 128
    # the ``paged`` cache walk (CPU's choice; TPU's own is a loop-free Mosaic kernel), for its data-dependent loops
    step = compile_decode(cfg, devices, batch=2, block_size=4, context=context, max_new_tokens=32, cache_page=page,
                          modes=("ar",), with_prefill=False, cache_attention="paged")["ar step"]
    assert step.unoptimized_hlo
    t = tpu_time(step.program, step.unoptimized_hlo, target.chip, step.assumed_trips, live_cache_slots=context)
    assert t.chip == "v5e" and 0 < t.ceiling_s < t.expected_s
    # the paged cache walk (one loop per layer) is data-dependent: charged the pages up to the context
    walks = [lp for lp in t.loops if lp.trips is None]
    assert len(walks) == cfg.num_layers and all(lp.assumed == context // page for lp in walks)
    # at least the weights stream once per step at the ceiling
    assert t.ceiling_s >= cfg.num_params * 2 / target.chip.hbm_bytes_per_s
    assert t.summary()["loops"] and "no host round trips" in t.summary()["assumptions_line"]


@pytest.mark.parametrize("name", ["v5e-4", pytest.param("v5p-8", marks=pytest.mark.slow)])
def test_vmem_buffers_are_not_hbm_traffic(name):
    """XLA:TPU prefetches weights into VMEM with async slices and hands the whole cache to nested fusions that read
    a page of it; HBM traffic counts each weight once and the cache at most once per read and write."""
    from tidar_jax.analysis.tpu_time import hbm_corrected, with_trip_counts
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.config import ModelConfig
    from tidar_jax.analysis.decode_plan import compile_decode

    target, devices = _v5e(name)
    cfg = ModelConfig(vocab_size=4096, hidden_size=896, num_layers=2, num_heads=14, num_kv_heads=2, head_dim=64,
                      mlp_size=4864, dtype="bfloat16", param_dtype="bfloat16", mask_token_id=1, block_size=4)
    step = compile_decode(cfg, devices, batch=1, block_size=4, context=1024, max_new_tokens=32, cache_page=128,
                          modes=("ar",), with_prefill=False, cache_attention="paged")["ar step"]
    program, _ = with_trip_counts(step.program, step.unoptimized_hlo, step.assumed_trips)
    raw = estimate(program, target.chip, step.assumed_trips)
    hbm = hbm_corrected(raw, program, target.chip)
    weights = cfg.num_params * 2
    cache = 2 * cfg.num_layers * (1024 + 32 + 4) * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, every slot
    assert weights <= hbm.bytes < raw.bytes
    assert hbm.bytes <= weights + 3 * cache + 2 ** 20
    starts = [k for k in hbm.kernels if k.kind.endswith("slice-start")]
    if starts:  # the prefetch moves its slice once: HBM -> VMEM
        assert all(k.bytes_written == 0 and k.bytes_read > 0 for k in starts)
