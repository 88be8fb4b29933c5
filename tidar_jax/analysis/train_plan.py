"""``train.py --plan``: compile the real train step on abstract inputs and report per-device memory and FLOPs.

Nothing is allocated and no data is read: the train state and the batch are ``ShapeDtypeStruct``s carrying their
shardings on a mesh of (fake CPU) devices, and ``jit(...).lower(...).compile()`` gives XLA's own figures
(``memory_analysis``, ``cost_analysis``). Beside them an analytic breakdown (parameters, optimizer state, saved
activations per layer under the remat policy, attention and loss workspaces) shows where XLA:CPU's temporaries
may differ from an accelerator's (XLA:CPU schedules for CPU and may keep what remat would let a GPU drop).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.config import ConfigError, ModelConfig
from tidar_jax.train.config import TrainConfig, check_block_alignment

GIB = 1024 ** 3


def plan_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture from the preset's model section (never reads ``init_from`` or the data manifest)."""
    arch = dict(cfg.model.arch)
    if arch.get("mask_token_id") is None:
        arch["mask_token_id"] = arch.get("vocab_size", ModelConfig.vocab_size) - 1  # any id: shapes only
    required = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_size")
    missing = [k for k in required if k not in arch]
    if cfg.model.init_from and missing:
        raise ConfigError(f"--plan needs the architecture in the preset's model section (missing {missing}); "
                          f"model.init_from={cfg.model.init_from!r} is not read")
    arch["block_size"] = cfg.trained_block_size(arch.get("block_size", ModelConfig.block_size))
    return ModelConfig.from_dict(arch)


def _sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (device 0's shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def analytic(cfg: TrainConfig, mcfg: ModelConfig, mesh_shape, attention: str = "reference") -> dict:
    """Independent per-device estimates from the config alone (formulas in docs/training.md)."""
    data, fsdp, tensor = mesh_shape
    dp = data * fsdp
    n_dev = data * fsdp * tensor
    d, f, L, v = mcfg.hidden_size, mcfg.mlp_size, mcfg.num_layers, mcfg.vocab_size
    h, kv, hd = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
    act = jnp.dtype(mcfg.dtype).itemsize
    pbytes = jnp.dtype(mcfg.param_dtype).itemsize
    tidar = cfg.train.objective == "tidar"
    s = cfg.data.seq_len
    t = 2 * s if tidar else s
    micro = cfg.data.global_batch // cfg.optim.grad_accum
    b = micro / dp  # sequences per device per micro-batch
    # parameters and optimizer: FSDP shards every matrix (embed axis) over fsdp, heads/mlp/vocab over tensor
    params = mcfg.num_params * pbytes / (fsdp * tensor)
    optimizer = 2 * params  # Adam mu + nu in the param dtype
    grads = params  # float32 accumulator when grad_accum > 1 (same size)
    policy = cfg.model.remat
    per_token = {  # bytes kept per token per layer for backward (activations in the compute dtype)
        "full": d,
        "qkvo": d + (h + 2 * kv) * hd + d,
        "dots": d + (h + 2 * kv) * hd + d + 3 * f,
        "none": 4 * d + 2 * (h + 2 * kv) * hd + h * hd + 4 * f,
    }[policy] * act
    saved_activations = L * b * t * per_token / tensor ** (policy != "full")
    # one layer recomputed at a time: its working set is the 'none' per-token footprint
    layer_workspace = b * t * (4 * d + 2 * (h + 2 * kv) * hd + h * hd + 4 * f) * act
    if attention == "reference":
        attn = b * (h / tensor) * t * t * (4 + act + 1)  # f32 scores, probs, boolean mask broadcast
    else:  # block-sparse kernels: one key tile of f32 scores and probabilities per query, plus the f32 accumulator
        from tidar_jax.attention.blockwise import TILE_K

        attn = b * (h / tensor) * t * (TILE_K * 8 + hd * 4 + 8)
    chunk = cfg.train.loss_chunk or s
    halves = 2 if tidar else 1
    loss = b * halves * chunk * (v / tensor) * 4 * 2  # f32 logits and their softmax for one chunk
    flops = training_flops(cfg, mcfg) / n_dev
    total = params + optimizer + (grads if cfg.optim.grad_accum > 1 else params) + saved_activations \
        + layer_workspace + attn + loss
    return {"params_bytes": params, "optimizer_bytes": optimizer, "grad_bytes": grads,
            "saved_activations_bytes": saved_activations, "saved_activation_bytes_per_layer": saved_activations / L,
            "layer_workspace_bytes": layer_workspace, "attention_workspace_bytes": attn, "loss_workspace_bytes": loss,
            "total_bytes": total, "flops": flops}


def training_flops(cfg: TrainConfig, mcfg: ModelConfig) -> float:
    """Global FLOPs of one step: 6 x matmul params x tokens + attention (dense: every query-key pair), plus one
    more forward of the layers when they are rematerialised."""
    tidar = cfg.train.objective == "tidar"
    s = cfg.data.seq_len
    t = 2 * s if tidar else s
    n = cfg.data.global_batch
    d, v = mcfg.hidden_size, mcfg.vocab_size
    embed = v * d
    head = 0 if mcfg.tie_embeddings else v * d
    layer_params = mcfg.num_params - embed - head - d  # matmul weights (+ norms/biases: negligible)
    matmul = layer_params + v * d  # the LM head matmul (tied or not); the embedding lookup is free
    attn_fwd = 4 * t * t * mcfg.num_heads * mcfg.head_dim * mcfg.num_layers  # QK^T and PV per sequence
    fwd = 2 * matmul * t + attn_fwd
    recompute = 0 if cfg.model.remat == "none" else 2 * layer_params * t + attn_fwd
    return n * (3 * fwd + recompute)


def _segment_ids(cfg: TrainConfig, batch):
    """Packed documents (``data.packing`` documents, or unset: the default for a new run) feed segment ids to the
    step, as a real run does; windows feed none."""
    return None if cfg.data.packing == "windows" else batch


def nnx_abstract(mcfg: ModelConfig, remat: str):
    from tidar_jax.model.functional import abstract_model

    return abstract_model(mcfg, remat=remat)


def _step_flops(graphdef, mcfg, abstract, mesh, cfg: TrainConfig, devices) -> float:
    """Per-device FLOPs of one step by XLA's cost analysis of an unrolled lowering of one micro-batch (XLA counts
    a while-loop body once, so the scanned program under-reports); times the number of micro-batches. Attention
    is counted dense (every query-key pair)."""
    import dataclasses

    from tidar_jax.scan_options import unrolled_scans
    from tidar_jax.train.step import abstract_train_state, make_step_fns

    accum = cfg.optim.grad_accum
    micro_shape = (cfg.data.global_batch // accum, cfg.data.seq_len)
    # the block-sparse kernels scan their tiles (a loop XLA would count once): count with the dense reference
    # kernel instead, an upper bound that includes the empty tiles those kernels skip
    mcfg = mcfg.replace(attention="reference")
    graphdef, abstract = nnx_abstract(mcfg, cfg.model.remat)
    optim = dataclasses.replace(cfg.optim, grad_accum=1)
    fns = make_step_fns(graphdef, mcfg, abstract, mesh, optim, cfg.train.steps, cfg.train.objective,
                        cfg.train.alpha, loss_chunk=cfg.train.loss_chunk, strict=cfg.mesh.strict,
                        batch_shape=micro_shape)
    state = abstract_train_state(fns.tx, abstract, fns.state_shardings)
    batch = jax.ShapeDtypeStruct(micro_shape, jnp.int32, sharding=fns.batch_sharding)
    with unrolled_scans():
        cost = fns.train_step.lower(state, batch, _segment_ids(cfg, batch)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # the lowered (unpartitioned) module counts the global program: divide by the devices
    return float(cost.get("flops", float("nan"))) * accum / len(devices)


def compile_train_step(cfg: TrainConfig, num_devices: int | None = None, devices=None):
    """``(compiled, seconds, context)``: the real train step lowered and compiled on abstract inputs, over
    ``devices`` (a target's deviceless devices: wrap the call in ``targets.compiling_for``) or jax's own."""
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh
    from tidar_jax.train.distributed import resolve_mesh_shape
    from tidar_jax.train.step import abstract_train_state, make_step_fns

    if devices is None:
        devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    mcfg = plan_model_config(cfg)
    check_block_alignment(cfg, mcfg.block_size)
    mesh_shape = resolve_mesh_shape(cfg.mesh, len(devices))
    dp = mesh_shape[0] * mesh_shape[1]
    if cfg.data.global_batch % (dp * cfg.optim.grad_accum):
        raise ConfigError(f"data.global_batch={cfg.data.global_batch}: must be divisible by mesh data*fsdp={dp} "
                          f"times optim.grad_accum={cfg.optim.grad_accum}")
    mesh = make_mesh(*mesh_shape, devices=devices)
    graphdef, abstract = abstract_model(mcfg, remat=cfg.model.remat)
    batch_shape = (cfg.data.global_batch, cfg.data.seq_len)
    fns = make_step_fns(graphdef, mcfg, abstract, mesh, cfg.optim, cfg.train.steps, cfg.train.objective,
                        cfg.train.alpha, loss_chunk=cfg.train.loss_chunk, strict=cfg.mesh.strict,
                        batch_shape=batch_shape)
    state = abstract_train_state(fns.tx, abstract, fns.state_shardings)
    batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=fns.batch_sharding)
    t0 = time.perf_counter()
    lowered = fns.train_step.lower(state, batch, _segment_ids(cfg, batch))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # the HLO before XLA's passes keeps the loops' trip counts XLA:TPU's optimised HLO drops (analysis.tpu_time)
    context = dict(devices=devices, mcfg=mcfg, mesh=mesh, mesh_shape=mesh_shape, graphdef=graphdef,
                   abstract=abstract, state=state, batch=batch, unoptimized_hlo=lowered.as_text(dialect="hlo"))
    return compiled, compile_s, context


def run_plan(cfg: TrainConfig, num_devices: int | None = None, target=None) -> dict:
    """Compile the train step for ``cfg`` on the available (fake) devices, or for ``target`` (a
    ``tidar_jax.targets.Target``: XLA:GPU / XLA:TPU on its deviceless devices, kernels chosen for its platform);
    return per-device figures, and for a target the cost model's step time and MFU (estimates)."""
    from tidar_jax.targets import compiling_for, target_devices

    if target is None:
        compiled, compile_s, ctx = compile_train_step(cfg, num_devices)
    else:
        with compiling_for(target):
            compiled, compile_s, ctx = compile_train_step(cfg, devices=target_devices(target))
    devices, mcfg, mesh, mesh_shape = ctx["devices"], ctx["mcfg"], ctx["mesh"], ctx["mesh_shape"]
    graphdef, abstract, state, batch = ctx["graphdef"], ctx["abstract"], ctx["state"], ctx["batch"]
    mem = compiled.memory_analysis()
    platform = "gpu" if target is None else target.platform
    estimate = None
    if target is None:
        flops = _step_flops(graphdef, mcfg, abstract, mesh, cfg, devices)
    else:  # XLA's cost analysis is None for a deviceless compile: the cost model counts
        estimate = train_estimate(compiled, cfg, mcfg, target, ctx["unoptimized_hlo"])
        flops = estimate["flops_per_device"]
    argument = int(mem.argument_size_in_bytes)
    output = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    from tidar_jax.attention import resolve

    attention = resolve(mcfg.attention, platform)  # what model.attention means there (GPU auto: blockwise)
    return {
        "target": None if target is None else {"name": target.name, "chips": target.count,
                                               "device_kind": devices[0].device_kind, "platform": target.platform},
        "estimate": estimate,
        "config": {"num_devices": len(devices), "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
                   "seq_len": cfg.data.seq_len, "global_batch": cfg.data.global_batch,
                   "grad_accum": cfg.optim.grad_accum, "remat": cfg.model.remat, "loss_chunk": cfg.train.loss_chunk,
                   "objective": cfg.train.objective, "attention": attention, "num_params": mcfg.num_params,
                   "dtype": mcfg.dtype, "param_dtype": mcfg.param_dtype},
        "per_device": {"argument_bytes": argument, "output_bytes": output, "alias_bytes": alias,
                       "temp_bytes": temp, "total_bytes": argument + output - alias + temp,
                       "flops": flops,
                       "state_bytes": _sharded_bytes(state), "batch_bytes": _sharded_bytes(batch) * (1 if _segment_ids(cfg, batch) is None else 2)},
        "analytic_per_device": analytic(cfg, mcfg, mesh_shape, attention),
        "compile_seconds": compile_s,
    }


def train_estimate(compiled, cfg: TrainConfig, mcfg: ModelConfig, target, unoptimized_hlo: str = "") -> dict:
    """One train step on ``target`` at two levels (docs/estimates.md), per device (every device runs the same SPMD
    program): ``ceiling_s`` (the cost model: datasheet peaks, its assumptions carried) and ``expected_s`` (peaks
    derated by public measurements, ``analysis.efficiency``), with the MFU (``train.flops.model_flops`` over the
    step time times the chips' bf16 peak), tokens/s and the attention kernels' share of the step at both levels.
    On a TPU the loops' trip counts come from ``unoptimized_hlo`` (``analysis.tpu_time``)."""
    from tidar_jax.analysis.chips import chip_costs
    from tidar_jax.analysis.efficiency import ATTENTION_CUDNN, ATTENTION_PALLAS, expected
    from tidar_jax.analysis.hlo import HloProgram
    from tidar_jax.train.flops import model_flops

    program = HloProgram.of(compiled)
    if target.platform == "tpu":
        from tidar_jax.analysis.tpu_time import tpu_time

        t = tpu_time(program, unoptimized_hlo, target.chip)
        out = {**t.summary(), "flops_per_device": t.flops, "launches": t.launches}
        by = {"ceiling": t.ceiling_by_class, "expected": t.expected_by_class}
    else:
        from tidar_jax.analysis.cost_model import estimate

        est = estimate(program, target.chip)
        exp = expected(est, target.chip, graph=False)
        out = {**est.summary(), "flops_per_device": est.flops, "ceiling_s": exp.ceiling_s,
               "expected_s": exp.expected_s, "ceiling_by_class_s": exp.ceiling_by_class,
               "expected_by_class_s": exp.expected_by_class,
               "loops": [{"trip_count": lp.trip_count, "body_kernels": len(lp.body_kernels), "op_name": lp.op_name}
                         for lp in program.loops()]}
        by = {"ceiling": exp.ceiling_by_class, "expected": exp.expected_by_class}
    useful = model_flops(mcfg, cfg.data.global_batch, cfg.data.seq_len, cfg.train.objective)
    peak = chip_costs(target.chip).peak_bf16_flops * target.count
    tokens = cfg.data.global_batch * cfg.data.seq_len
    out.update({"model_flops": useful, "launches_per_micro_batch": out["launches"] / cfg.optim.grad_accum})
    for level in ("ceiling", "expected"):
        step = out[f"{level}_s"]
        attention = by[level].get(ATTENTION_PALLAS, 0.0) + by[level].get(ATTENTION_CUDNN, 0.0)
        out.update({f"mfu_{level}": useful / (step * peak), f"tokens_per_s_{level}": tokens / step,
                    f"attention_share_{level}": attention / step})
    return out


def format_plan(result: dict) -> str:
    c, p, a = result["config"], result["per_device"], result["analytic_per_device"]

    def g(x):
        return f"{x / GIB:9.3f} GiB"

    lines = [
        f"plan: {c['num_params'] / 1e9:.3f}B params, {c['objective']} S={c['seq_len']} global batch "
        f"{c['global_batch']} (grad_accum {c['grad_accum']}), mesh {c['mesh']} on {c['num_devices']} devices, "
        f"remat={c['remat']}, loss_chunk={c['loss_chunk']}, attention={c['attention']}, compiled in "
        f"{result['compile_seconds']:.1f} s",
        "per device (XLA compiled):",
        f"  arguments {g(p['argument_bytes'])}   outputs {g(p['output_bytes'])} (aliased {g(p['alias_bytes'])})",
        f"  temporaries {g(p['temp_bytes'])}   total {g(p['total_bytes'])}   FLOPs "
        f"{'not counted' if p['flops'] is None else format(p['flops'], '.3e')}",
        "per device (analytic):",
        f"  params {g(a['params_bytes'])}   optimizer {g(a['optimizer_bytes'])}   grads {g(a['grad_bytes'])}",
        f"  saved activations {g(a['saved_activations_bytes'])} ({g(a['saved_activation_bytes_per_layer'])} per "
        f"layer)   one-layer workspace {g(a['layer_workspace_bytes'])}",
        f"  attention workspace {g(a['attention_workspace_bytes'])}   loss workspace {g(a['loss_workspace_bytes'])}",
        f"  total {g(a['total_bytes'])}   FLOPs {a['flops']:.3e}",
    ]
    t, e = result.get("target"), result.get("estimate")
    if t:
        lines[0] += f"; target {t['name']} ({t['chips']} x {t['device_kind']})"
        lines[1] = f"per device (XLA:{t['platform'].upper()} compiled for {t['device_kind']}):"
    if e:
        gpu = "launch_time_s" in e
        lines.append(
            f"ESTIMATE (not a measurement; docs/estimates.md): step ceiling {e['ceiling_s']:.3f} s, expected "
            f"{e['expected_s']:.3f} s; MFU ceiling {100 * e['mfu_ceiling']:.1f}%, expected "
            f"{100 * e['mfu_expected']:.1f}%; attention kernels' share ceiling "
            f"{100 * e['attention_share_ceiling']:.1f}%, "
            f"expected {100 * e['attention_share_expected']:.1f}%; tokens/s ceiling {e['tokens_per_s_ceiling']:.0f}, "
            f"expected {e['tokens_per_s_expected']:.0f}")
        if gpu:
            lines.append(
                f"  ceiling by bound: {e['launches']} kernel launches ({e['launches_per_micro_batch']:.0f} per "
                f"micro-batch, launch time {e['launch_time_s']:.3f} s); compute-bound kernels "
                f"{e['compute_bound_time_s']:.3f} s, memory-bound {e['memory_bound_time_s']:.3f} s, launch-bound "
                f"{e['launch_bound_time_s']:.3f} s, collectives {e['collective_time_s']:.3f} s")
        else:
            static = sorted({lp["trips"] for lp in e["loops"] if lp["trips"] is not None})
            lines.append(f"  {e['launches']} ops per step; {len(e['loops'])} loops, trip counts "
                         f"{static or 'none static'} from the unoptimised HLO (XLA:TPU's optimised HLO drops them)")
        lines += [
            f"  model FLOPs {e['model_flops']:.3e} per step (mask-allowed attention, no remat); counted dots "
            f"{e['flops_per_device']:.3e} per device",
            f"  assumptions: {e['assumptions_line']}",
            "  ceiling: datasheet peaks; expected: peaks derated by public measurements, per kernel class",
        ]
    return "\n".join(lines)


def json_summary(result: dict) -> dict:
    """The ``--json`` document: per device argument/output/temp/total bytes and FLOPs, plus the rest."""
    return {**result, "argument_bytes": result["per_device"]["argument_bytes"],
            "output_bytes": result["per_device"]["output_bytes"], "temp_bytes": result["per_device"]["temp_bytes"],
            "total_bytes": result["per_device"]["total_bytes"], "flops": result["per_device"]["flops"]}


def to_builtin(x):
    if isinstance(x, dict):
        return {k: to_builtin(v) for k, v in x.items()}
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
