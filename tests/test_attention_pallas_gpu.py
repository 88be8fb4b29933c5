"""The Pallas GPU kernel (``model.attention=pallas_gpu``): equal to the reference kernel in outputs and gradients in
the Pallas interpreter on CPU; its token ids and tile tables reproduce the layout's rule and schedule exactly; it
compiles for an H100 target with no XLA ``while`` loop over attention tiles (which the ``blockwise`` train step has).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import attention, masks, targets
from tidar_jax.attention import pallas_gpu, reference
from tidar_jax.attention.schedule import tile_schedule
from tidar_jax.config import ConfigError
from kernel_cases import assert_close, random_inputs, random_segments, value_and_grads

H, KV, D = 4, 2, 16  # GQA: two query heads per kv head; D >= 16 as Triton's dot needs
TILE = pallas_gpu.Tiles(16, 16, 16, 16, num_warps=4, num_stages=1)


def _inputs(layout, n, dtype, seed=0, heads=H, kv_heads=KV, d=D):
    return random_inputs(layout, n, dtype, seed, heads, kv_heads, d)


def _pallas(tiles):
    return lambda q, k, v, lay: pallas_gpu.attend(q, k, v, lay, tiles=tiles, interpret=True)


def _case(name, make, n, tiles, slow=False, kv_heads=KV):
    return pytest.param(make, n, tiles, kv_heads, id=name, marks=[pytest.mark.slow] if slow else [])


# lengths are not multiples of the tiles unless stated
CASES = [
    _case("train-S12-B4", lambda: masks.training_layout(12, 4), 2, TILE),
    _case("train-seg-S12-B4", lambda: masks.training_layout(12, 4, random_segments(2, 12, 1)), 2, TILE),
    _case("causal-S21", lambda: masks.causal_layout(21), 2, TILE),
    _case("prefill-P9-B3", lambda: masks.prefill_layout(jnp.array([9, 4]), 9, 3), 2, TILE),
    _case("train-S24-B8-fwd16x32-bwd32x16", lambda: masks.training_layout(24, 8), 1,
          pallas_gpu.Tiles(16, 32, 32, 16, 4, 1), slow=True),
    _case("train-S32-B4-multiple", lambda: masks.training_layout(32, 4), 1, TILE, slow=True),
    _case("causal-seg-S19", lambda: masks.causal_layout(19, random_segments(2, 19, 4)), 2, TILE, slow=True),
    _case("train-S12-B4-mha", lambda: masks.training_layout(12, 4), 1, TILE, slow=True, kv_heads=H),
    _case("train-S12-B4-one-kv-head", lambda: masks.training_layout(12, 4), 1, TILE, slow=True, kv_heads=1),
    _case("decode-B3-C10", lambda: masks.decode_attention_layout(jnp.array([0, 6]), 3, 10), 2, TILE, slow=True),
]


@pytest.mark.parametrize("make,n,tiles,kv_heads", CASES)
def test_pallas_gpu_equals_reference_fp32(make, n, tiles, kv_heads):
    layout = make()
    q, k, v, w = _inputs(layout, n, jnp.float32, kv_heads=kv_heads)
    assert_close(value_and_grads(_pallas(tiles), layout, q, k, v, w),
                 value_and_grads(reference.attend, layout, q, k, v, w), 1e-5, relative_grad_atol=False)


def test_pallas_gpu_bf16_within_twice_the_reference_error():
    """bf16 inputs: the error against a float64 reference on the same (rounded) inputs is at most 2x the
    reference kernel's own bf16 error (plus 1e-3 of the output / gradient scale, for exact-zero cases)."""
    layout = masks.training_layout(12, 4, random_segments(2, 12, 3))
    q, k, v, w = _inputs(layout, 2, jnp.bfloat16, seed=2)
    ref_out, ref_g = value_and_grads(reference.attend, layout, q, k, v, w)
    out, g = value_and_grads(_pallas(TILE), layout, q, k, v, w)
    assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
    with jax.enable_x64(True):
        w64 = w.astype(jnp.float64)
        exact_out, exact_g = value_and_grads(reference.attend, layout,
                                              *(x.astype(jnp.float64) for x in (q, k, v)), w64)

    def err(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    out_scale = float(np.max(np.abs(np.asarray(exact_out))))
    assert err(out, exact_out) <= 2 * err(ref_out, exact_out) + 1e-3 * out_scale
    for got, rf, ex in zip(g, ref_g, exact_g):
        scale = float(np.max(np.abs(np.asarray(ex))))
        assert err(got, ex) <= 2 * err(rf, ex) + 1e-3 * scale


# ----------------------------------------------------------------------------------------------------------------
# What the kernels read equals the one definition (masks.py rules, schedule.py schedule)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [
    masks.TrainingLayout(12, 4, np.asarray(random_segments(3, 12, 5))),
    masks.CausalLayout(11, np.asarray(random_segments(2, 11, 6))),
    masks.PrefillLayout(np.array([1, 6, 9]), 9, 3),
    masks.DecodeLayout(np.array([0, 4, 10]), 3, 10),
], ids=["train-seg", "causal-seg", "prefill", "decode"])
def test_row_ids_reproduce_the_layout_rule(layout):
    """static rule & (same token id | diagonal) == the layout's full rule, for every row."""
    n = len(layout._row_data()[0])
    ids_q, ids_k, diagonal = pallas_gpu.row_ids(layout, n)
    q_idx, k_idx = np.arange(layout.q_len)[:, None], np.arange(layout.k_len)[None, :]
    same = np.asarray(ids_q)[:, :, None] == np.asarray(ids_k)[:, None, :]
    if diagonal:
        same = same | (q_idx == k_idx)[None]
    got = layout.static_rule(q_idx, k_idx, np)[None] & same
    np.testing.assert_array_equal(got, np.asarray(layout.block()))
    assert pallas_gpu.row_ids(masks.training_layout(12, 4), n) is None  # static layouts carry no ids


@pytest.mark.parametrize("transposed", [False, True])
def test_tile_table_lists_exactly_the_schedule(transposed):
    sched = tile_schedule(masks.training_layout(40, 8), 16, 32)
    rows = (sched.num_k_tiles if transposed else sched.num_q_tiles) + 1  # one extra row: a padding tile
    table, wf = pallas_gpu.tile_table(sched, transposed, rows)
    assert (table.shape[1] & (table.shape[1] - 1)) == 0  # a power of two
    r, c = (1, 0) if transposed else (0, 1)
    for kind, pairs in (("full", sched.full_pairs), ("partial", sched.partial_pairs)):
        listed = set()
        for row in range(rows):
            nf, npart = table[row, 0], table[row, 1]
            cols = table[row, 2:2 + nf] if kind == "full" else table[row, 2 + wf:2 + wf + npart]
            listed |= {(row, int(x)) for x in cols}
        assert listed == {(int(p[r]), int(p[c])) for p in pairs}
    assert table[rows - 1, :2].tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------------------------

def test_resolve_never_picks_it_off_a_gpu_and_explains_why():
    assert attention.resolve("auto", "cpu") == "blockwise"
    with pytest.raises(ConfigError, match="model.attention='pallas_gpu' needs an NVIDIA GPU"):
        attention.resolve("pallas_gpu", "cpu")
    with pallas_gpu.interpreting():
        assert attention.resolve("pallas_gpu", "cpu") == "pallas_gpu"
        assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("pallas_gpu", "gpu") == "pallas_gpu"
    assert attention.resolve("auto", "gpu") == "pallas_gpu"


def test_interpreting_runs_through_the_interface():
    layout = masks.training_layout(8, 4)
    q, k, v, _ = _inputs(layout, 1, jnp.float32)
    with pallas_gpu.interpreting():
        out = jax.jit(lambda q, k, v: attention.attend(q, k, v, layout, "pallas_gpu"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference.attend(q, k, v, layout)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Compiled for an H100 (deviceless): the kernels lower through Triton, one launch per direction
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def h100_mesh(h100_devices):
    from jax.sharding import Mesh

    return Mesh(np.array(h100_devices[:1]), ("x",))


def compile_attention(mesh, s, block, n, heads, kv_heads, d, segments: bool, tiles=None):
    """HloProgram of forward + backward of ``pallas_gpu`` on the training layout, compiled for the mesh's GPU."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tidar_jax.analysis.hlo import HloProgram

    sh = NamedSharding(mesh, P())
    q = jax.ShapeDtypeStruct((n, 2 * s, heads, d), jnp.bfloat16, sharding=sh)
    k = jax.ShapeDtypeStruct((n, 2 * s, kv_heads, d), jnp.bfloat16, sharding=sh)
    seg = jax.ShapeDtypeStruct((n, s), jnp.int32, sharding=sh)

    def f(q, k, v, seg_NS):
        layout = masks.training_layout(s, block, seg_NS if segments else None)
        out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.attend(q, k, v, layout, tiles=tiles), q, k, v)
        return out, vjp(out)

    with targets.compiling_for("gpu"):
        return HloProgram.of(jax.jit(f).lower(q, k, k, seg).compile())


def _triton_calls(program):
    return [kern for kern in program.kernels() if kern.kind == "custom-call:__gpu$xla.gpu.triton"]


SMALL = dict(s=256, block=16, n=2, heads=4, kv_heads=2, d=64)  # the small H100 compile, default (H100) tiles
_SMALL_PROGRAMS: dict = {}


def _small_program(mesh, segments: bool):
    if segments not in _SMALL_PROGRAMS:  # one compile shared by the tests that read it
        _SMALL_PROGRAMS[segments] = compile_attention(mesh, *SMALL.values(), segments)
    return _SMALL_PROGRAMS[segments]


@pytest.mark.parametrize("segments", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiles_for_h100_small(h100_mesh, segments):
    """Forward, dQ and dK/dV: three Triton kernels, no XLA loop."""
    program = _small_program(h100_mesh, segments)
    assert program.loops() == []
    assert len(_triton_calls(program)) == 3


def test_cost_model_charges_the_tiles_each_kernel_visits(h100_mesh):
    """The cost model charges each Triton kernel of the compiled H100 program for the tile pairs it visits, counted
    here from the dense mask (not from schedule.py) times the matmuls one pair and query head costs (forward 2,
    dQ 3, dK/dV 4, each 2 x tq x tk x D): well under the every-pair count of its operands."""
    from tidar_jax.analysis.cost_model import estimate

    c = SMALL
    t = 2 * c["s"]
    tiles = pallas_gpu.TILES[pallas_gpu.DEFAULT_TARGET]  # what a deviceless compile uses
    allow = np.asarray(masks.training_mask(c["s"], c["block"]))  # [T, T]

    def visited(tq, tk):  # tiles holding at least one allowed pair (T is a multiple of both tiles here)
        return int(allow.reshape(t // tq, tq, t // tk, tk).any(axis=(1, 3)).sum())

    matmuls_and_tiles = {"fwd": (2, tiles.fwd_q, tiles.fwd_k), "dq": (3, tiles.bwd_q, tiles.bwd_k),
                         "dkv": (4, tiles.bwd_q, tiles.bwd_k)}
    est = estimate(_small_program(h100_mesh, False), targets.CHIPS["h100"])
    charged = {kind: k.flops for k in est.kernels for kind in matmuls_and_tiles
               if f"tidar_flash_{kind}__" in k.op_name}
    assert set(charged) == set(matmuls_and_tiles)
    dense_pair_flops = 2 * 2 * t * t * c["d"] * c["n"] * c["heads"]  # QK^T and PV over every pair
    for kind, (matmuls, tq, tk) in matmuls_and_tiles.items():
        assert charged[kind] == visited(tq, tk) * matmuls * 2 * tq * tk * c["d"] * c["n"] * c["heads"], kind
        assert charged[kind] < 0.8 * dense_pair_flops * matmuls / 2, kind


@pytest.mark.slow
def test_compiles_for_h100_at_the_1_5b_shape(h100_mesh):
    """qwen2.5-1.5b attention: S=4096 (T=8192), B=16, 12 query / 2 kv heads, head_dim 128, H100 tiles."""
    for segments in (False, True):
        program = compile_attention(h100_mesh, 4096, 16, 1, 12, 2, 128, segments, pallas_gpu.TILES["h100"])
        assert program.loops() == []
        assert len(_triton_calls(program)) == 3


def compile_train_step(mesh, kernel, seq_len=256, layers=3):
    """HloProgram of a small model's whole TiDAR train step (packed segments, bf16) compiled for the mesh's GPU."""
    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.config import ModelConfig
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.config import load_config
    from tidar_jax.train.step import abstract_train_state, make_step_fns

    mcfg = ModelConfig(vocab_size=256, hidden_size=128, num_layers=layers, num_heads=4, num_kv_heads=2,
                       mlp_size=256, mask_token_id=255, block_size=16, dtype="bfloat16", param_dtype="float32",
                       attention=kernel)
    graphdef, abstract = abstract_model(mcfg, remat="none")
    mesh = make_mesh(1, 1, 1, devices=list(mesh.devices.flat))  # the train step's named axes
    with targets.compiling_for("gpu"):
        fns = make_step_fns(graphdef, mcfg, abstract, mesh, load_config(None, []).optim, 10, "tidar", 1.0,
                            batch_shape=(2, seq_len))
        state = abstract_train_state(fns.tx, abstract, fns.state_shardings)
        batch = jax.ShapeDtypeStruct((2, seq_len), jnp.int32, sharding=fns.batch_sharding)
        return HloProgram.of(fns.train_step.lower(state, batch, batch).compile())


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["blockwise", "pallas_gpu"])
def test_train_step_has_no_loop_over_attention_tiles(h100_mesh, kernel):
    """The compiled H100 train step: ``blockwise`` scans its tile pairs (XLA ``while`` loops whose trip counts
    are the schedule's pair counts: the problem on a GPU); with ``pallas_gpu`` the only loops are the
    layer scans (forward and backward, trip count = layers)."""
    from tidar_jax.attention import blockwise

    seq_len, layers = 1024, 3
    loops = compile_train_step(h100_mesh, kernel, seq_len, layers).loops()
    sched = blockwise.schedule_for(masks.training_layout(seq_len, 16), 2 * seq_len, 2 * seq_len)
    # the step gets segment ids (packed rows), so every visited pair is partial: all pairs in one scan
    pair_counts = {len(sched.full_pairs), len(sched.partial_pairs), len(sched.full_pairs) + len(sched.partial_pairs)}
    tile_loops = [lp for lp in loops if lp.dynamic or lp.trip_count in pair_counts]
    if kernel == "blockwise":
        assert tile_loops, [(lp.trip_count, lp.op_name) for lp in loops]  # shows the test can fail
    else:
        assert tile_loops == []
        assert loops and all(lp.trip_count == layers for lp in loops)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_sharded_equals_reference(mesh_shape):
    """Inside ``activation_mesh`` (as the train step traces) the Triton calls run in a ``shard_map`` over rows
    and heads (XLA would otherwise gather every row to every device); outputs and gradients equal reference."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tidar_jax.sharding import activation_mesh, make_mesh

    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:8])
    layout = masks.training_layout(12, 4, random_segments(4, 12, 7))
    q, k, v, w = _inputs(layout, 4, jnp.float32)

    def sharded(q, k, v, lay):
        with activation_mesh(mesh):
            return pallas_gpu.attend(q, k, v, lay, tiles=TILE, interpret=True)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
    assert_close(value_and_grads(sharded, layout, q, k, v, w),
                 value_and_grads(reference.attend, layout, q, k, v, w), 1e-5, relative_grad_atol=False)


def test_kernels_run_on_each_devices_rows_on_8_h100(h100_mesh):
    """On 8 x H100 with the batch over fsdp, each device's Triton calls see its own rows (2 of 16), not all."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.sharding import activation_mesh, make_mesh

    mesh = make_mesh(1, 8, 1, devices=targets.target_devices("h100x8"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    layout = masks.training_layout(64, 16)
    q = jax.ShapeDtypeStruct((16, 128, 4, 64), jnp.bfloat16, sharding=rows)
    k = jax.ShapeDtypeStruct((16, 128, 2, 64), jnp.bfloat16, sharding=rows)

    def f(q, k, v):
        with activation_mesh(mesh):
            out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.attend(q, k, v, layout, tiles=TILE), q, k, v)
        return vjp(out)

    with targets.compiling_for("gpu"):
        program = HloProgram.of(jax.jit(f).lower(q, k, k).compile())
    calls = _triton_calls(program)
    assert len(calls) == 3
    for call in calls:
        assert {shape[0] for shape in _rank4_operands(program, call)} == {2}


def _rank4_operands(program, call):
    from tidar_jax.analysis.hlo import array_shapes

    return [shape for t in program.operand_types(call) for _, shape in array_shapes(t) if len(shape) >= 4]
