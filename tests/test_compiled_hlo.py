"""The compiled-program reader (tidar_jax/analysis/hlo.py) on a real XLA:GPU program compiled for an H100 here:
kernels, loops with known and data-dependent trip counts, launches and host round trips."""

import numpy as np
import pytest

from tidar_jax import targets
from tidar_jax.analysis.hlo import HloProgram, type_bytes


def test_type_bytes():
    assert type_bytes("f32[64,64]{1,0}") == 64 * 64 * 4
    assert type_bytes("(s32[], bf16[2,3]{1,0}, pred[5])") == 4 + 12 + 5


@pytest.fixture(scope="module")
def gpu_loops_program():
    reason = targets.missing_install(targets.parse_target("h100"))
    if reason:
        pytest.skip(reason)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(targets.target_devices("h100")), ("x",))

    def f(x, n):
        y = jax.lax.fori_loop(0, 10, lambda i, a: jnp.tanh(a @ a), x)
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.sin(c[1]) @ c[1]), (0, y))[1]

    s = NamedSharding(mesh, P())
    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=s),
                                jax.ShapeDtypeStruct((), jnp.int32, sharding=s)).compile()
    return HloProgram.of(compiled)


def test_loops_and_trip_counts(gpu_loops_program):
    p = gpu_loops_program
    loops = p.loops()
    assert sorted((lp.trip_count is None) for lp in loops) == [False, True]
    known = next(lp for lp in loops if not lp.dynamic)
    assert known.trip_count == 10
    # each iteration launches the matmul (a GEMM fusion or cuBLAS call) and the loop counter
    assert any("gemm" in k.kind or "cublas" in k.kind for k in known.body_kernels)


def test_launches_and_round_trips_scale_with_the_dynamic_trips(gpu_loops_program):
    p = gpu_loops_program
    dyn = next(lp for lp in p.loops() if lp.dynamic)
    per_iter = len(dyn.body_kernels)
    assert p.launches(dynamic_trips=5) - p.launches(dynamic_trips=1) == 4 * per_iter
    assert p.host_round_trips(dynamic_trips=5) == 6  # 5 iterations + the exit test, all from the one dynamic loop
    assert p.host_round_trips(dynamic_trips=1) == 2
