"""The cost model (tidar_jax/analysis/cost_model.py) against independent counts, on programs compiled here for an
H100 and a TPU v5e: the FLOPs of a model forward's dots equal the analytic count of the model (through the layer
scan's trip count), a transpose copy's bytes equal its size, a data-dependent loop costs its kernels plus a host
round trip per assumed iteration, an all-gather moves its ring traffic. Skip with the reason without the optional
compile installs (CI has them)."""

import numpy as np
import pytest

from tidar_jax import targets
from tidar_jax.analysis import cost_model
from tidar_jax.analysis.chips import chip_costs
from tidar_jax.analysis.hlo import HloProgram

H100 = targets.CHIPS["h100"]
H100_COSTS = chip_costs(H100)


def _devices(name):
    reason = targets.missing_install(targets.parse_target(name))
    if reason:
        pytest.skip(reason)
    return targets.target_devices(name)


def _compile(fn, devices, *shapes, spec=None):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), ("x",))
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, spec or P())) for s, d in shapes]
    return HloProgram.of(jax.jit(fn).lower(*args).compile())


def test_forward_dot_flops_equal_the_analytic_count():
    import jax
    import jax.numpy as jnp

    from tidar_jax import masks
    from tidar_jax.config import ModelConfig
    from tidar_jax.model.functional import abstract_model, merge
    from tidar_jax.train.flops import forward_flops

    devices = _devices("h100")
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, mlp_size=256,
                      dtype="bfloat16", param_dtype="bfloat16", attention="reference", mask_token_id=1)
    n, t = 2, 64
    graphdef, abstract = abstract_model(cfg)

    def forward(state, tokens_NT):
        positions_NT = jnp.broadcast_to(jnp.arange(t)[None], (n, t))
        return merge(graphdef, state)(tokens_NT, positions_NT, masks.causal_layout(t))[0]

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    s = NamedSharding(Mesh(np.array(devices), ("x",)), P())
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract)
    program = HloProgram.of(jax.jit(forward).lower(state, jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=s))
                            .compile())
    est = cost_model.estimate(program, H100)
    assert any(lp.trip_count == cfg.num_layers for lp in program.loops())  # the layers run as a scan
    assert est.flops == forward_flops(cfg, n, t)


def test_transpose_copy_bytes_equal_its_size():
    import jax.numpy as jnp

    program = _compile(lambda x: x.T, _devices("h100"), ((512, 1024), jnp.bfloat16))
    (kernel,) = program.kernels()
    read, written = cost_model.kernel_bytes(program, kernel)
    assert read == written == 512 * 1024 * 2
    est = cost_model.estimate(program, H100)
    (k,) = est.kernels
    assert k.flops == 0 and k.time_s == pytest.approx(2 * 512 * 1024 * 2 / H100.hbm_bytes_per_s + H100_COSTS.launch_s)


def test_matmul_flops_on_gpu_and_tpu():
    import jax.numpy as jnp

    shapes = (((256, 512), jnp.bfloat16), ((512, 1024), jnp.bfloat16))
    for name in ("h100", "v5e-4"):
        program = _compile(lambda a, b: a @ b, _devices(name), *shapes)
        chip = targets.parse_target(name).chip
        est = cost_model.estimate(program, chip)
        assert est.flops == 2 * 256 * 512 * 1024, name
        assert est.assumptions.chip == chip.name and chip.name in est.line()


def test_dynamic_loop_costs_a_round_trip_per_assumed_iteration():
    import jax
    import jax.numpy as jnp

    def f(x, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.sin(c[1]) @ c[1]), (0, x))[1]

    program = _compile(f, _devices("h100"), ((64, 64), jnp.float32), ((), jnp.int32))
    one, five = cost_model.estimate(program, H100, 1), cost_model.estimate(program, H100, 5)
    (loop,) = program.loops()
    per_iteration = sum(cost_model.kernel_cost(program, k, one.assumptions, 1).time_s for k in loop.body_kernels)
    assert five.host_round_trips - one.host_round_trips == 4
    assert five.time_s - one.time_s == pytest.approx(4 * (per_iteration + H100_COSTS.host_round_trip_s))
    assert five.flops - one.flops == 4 * 2 * 64 ** 3
    assert "5 iterations assumed" in five.assumptions.line()


def test_all_gather_moves_its_ring_traffic():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(_devices("h100x8")), ("x",))
    # gathering the sharded result: each chip receives (and, in a ring, forwards) 7/8 of the whole array
    arg = jax.ShapeDtypeStruct((8 * 1024, 256), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    gathered = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P())).lower(arg).compile()
    program = HloProgram.of(gathered)
    est = cost_model.estimate(program, H100)
    (coll,) = [k for k in est.kernels if k.bound == "collective"]
    assert coll.bytes_read == pytest.approx(7 / 8 * 8 * 1024 * 256 * 4)


def test_attention_flops_from_operand_shapes():
    q, k = (2, 128, 8, 64), (2, 512, 2, 64)
    assert cost_model.attention_flops([q, k, k], backward=False) == 4 * 2 * 128 * 8 * 64 * 512
    assert cost_model.attention_flops([q, k, k], backward=True) == 2.5 * 4 * 2 * 128 * 8 * 64 * 512
    assert cost_model.attention_flops([(2, 8, 128, 64), (2, 2, 512, 64)], backward=False) == 4 * 2 * 8 * 128 * 64 * 512


_FMHA_HLO = """HloModule m

ENTRY %main (q: bf16[1,128,4,64], k: bf16[1,128,2,64]) -> bf16[1,128,4,64] {
  %q = bf16[1,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[1,128,2,64]{3,2,1,0} parameter(1)
  ROOT %fmha = bf16[1,128,4,64]{3,2,1,0} custom-call(%q, %k, %k), custom_call_target="TARGET", metadata={op_name="OP"}
}
"""


@pytest.mark.parametrize("target, op_name, backward", [
    ("__cudnn$fmhaScaleBiasSoftmax", "jit(fwd_bwd)/jvp()/dot_product_attention_fwd", False),
    ("__cudnn$fmhaScaleBiasSoftmaxBackward", "jit(fwd_bwd)/transpose(jvp())/dot_product_attention_bwd", True),
    ("__cudnn$fmhaScaleBiasSoftmax", "jit(step)/transpose(jvp())/dot_product_attention_bwd", True)])
def test_attention_call_is_backward_by_its_own_name(target, op_name, backward):
    """A cuDNN attention call is a backward one by its target or its op's own name, never by the jitted
    function's name above it (the accelerator suite's program is called ``fwd_bwd``)."""
    program = HloProgram(_FMHA_HLO.replace("TARGET", target).replace("OP", op_name))
    (kernel,) = cost_model.estimate(program, H100).kernels
    assert kernel.flops == 4 * 128 * 4 * 64 * 128 * (2.5 if backward else 1.0)


_NAMED = "tidar_flash_fwd__pairs_3__tq_16__tk_32__rows_2__heads_4__dim_8"


@pytest.mark.parametrize("attrs", [
    f'metadata={{op_name="jit(f)/jvp({_NAMED})/pallas_call"}}',  # jax 0.10 and 0.11
    f'backend_config={{debug = false, grid_x = 4 : i32, ir = "ML\\EFR\\22x", name = "{_NAMED}", '
    'num_warps = 8 : i32}'])  # no op_name: the kernel name in the backend_config (jax 0.10's MLIR form)
def test_pallas_kernel_is_charged_the_work_its_name_gives(attrs):
    """A kernel named by ``kernel_names.work_name`` is charged the work of its visited tiles (3 pairs of 16 x 32,
    2 forward matmuls each, per row and head), not the every-pair attention count its operand shapes would give."""
    from tidar_jax.attention.kernel_names import work_name

    assert work_name("tidar_flash_fwd", pairs=3, tq=16, tk=32, rows=2, heads=4, dim=8) == _NAMED
    text = _FMHA_HLO.replace('metadata={op_name="OP"}', attrs).replace("TARGET", "__gpu$xla.gpu.triton")
    (kernel,) = cost_model.estimate(HloProgram(text), H100).kernels
    assert kernel.flops == 3 * 2 * 4 * 2 * 2 * 16 * 32 * 8


@pytest.mark.parametrize("s, b", [(16, 4), (32, 8), (24, 4)])
def test_mfu_counts_the_pairs_the_training_mask_allows(s, b):
    from tidar_jax import masks
    from tidar_jax.train.flops import attended_pairs

    assert attended_pairs(s, b, "tidar") == int(np.asarray(masks.training_mask(s, b)).sum())
    assert attended_pairs(s, b, "ar") == int(np.asarray(masks.causal_layout(s).block()).sum())
