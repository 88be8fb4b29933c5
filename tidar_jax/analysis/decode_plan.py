"""``decode.py --plan``: compile prefill and one decode step of AR and TiDAR for a target, without weights.

The programs are the ones ``Decoder.stream`` runs: ``engine.prefill`` and ``engine.step`` with the Decoder's
options, the per-layer (``LayerMajorParams``) weight layout, the decode dtype, and the step's state donated. Params,
prompt, cache and state are ``ShapeDtypeStruct``s carrying shardings on a mesh of the target's (deviceless)
devices, so nothing is allocated: what comes back is XLA:GPU's or XLA:TPU's compiled program, read with
``tidar_jax.analysis.hlo.HloProgram`` (kernels, ``while`` loops and their trip counts, host round trips) and its
``memory_analysis``.

The paged cache attention walks ``ceil(live length / page)`` pages in a loop whose trip count is only known at run
time; the plan reports that loop as dynamic and assumes ``ceil(context / page)`` iterations for the launch and
round-trip counts (``assumed_trips``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from tidar_jax.analysis.hlo import HloProgram
from tidar_jax.config import DEFAULT_BLOCK_SIZE, ModelConfig
from tidar_jax.decode import engine
from tidar_jax.decode.api import EOS_CAPACITY, STOP_CAPACITY, STOP_WINDOW, prompt_bucket
from tidar_jax.decode.options import DecodeOptions
from tidar_jax.targets import compiling_for, platform_of_devices

PROGRAMS = ("ar prefill", "ar step", "tidar prefill", "tidar step")


@dataclasses.dataclass
class CompiledDecodeProgram:
    """One compiled decode program and what the plan reports of it."""

    name: str  # "ar prefill" | "ar step" | "tidar prefill" | "tidar step"
    compiled: Any  # jax.stages.Compiled
    compile_s: float
    program: HloProgram
    assumed_trips: int  # iterations assumed for each data-dependent loop (cache pages up to the context)
    tokens_per_row: int  # query tokens one row feeds through the model in this program
    weight_bytes: int = 0  # all weights
    weight_bytes_per_device: int = 0  # the largest share of them one device's program takes as arguments
    unoptimized_hlo: str = ""  # the program's HLO before XLA's passes (its loops' trip counts: analysis.tpu_time)

    def summary(self, num_layers: int) -> dict:
        p = self.program
        entry = p.kernels()
        loops = p.loops()
        kinds: dict[str, int] = {}
        for k in entry:
            kinds[k.kind] = kinds.get(k.kind, 0) + 1
        launches = p.launches(self.assumed_trips)
        mem = self.compiled.memory_analysis()
        return {
            "program": self.name,
            "compile_seconds": round(self.compile_s, 2),
            "entry_kernels": len(entry),
            "entry_kernel_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "fusions": sum(1 for k in entry if k.opcode == "fusion"),
            "custom_calls": sum(1 for k in entry if k.opcode == "custom-call"),
            "loops": [{"trip_count": lp.trip_count, "dynamic": lp.dynamic, "body_kernels": len(lp.body_kernels),
                       "body_kernel_kinds": _kinds(lp.body_kernels), "op_name": lp.op_name} for lp in loops],
            "dynamic_loops": sum(1 for lp in loops if lp.dynamic),
            "assumed_dynamic_trips": self.assumed_trips,
            "launches": launches,
            "launches_per_layer": launches / num_layers,
            "host_round_trips": p.host_round_trips(self.assumed_trips),
            "memory": _memory(mem),
            "weight_bytes": self.weight_bytes,
            "weight_bytes_per_device": self.weight_bytes_per_device,
        }


def _kinds(kernels) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kernels:
        out[k.kind] = out.get(k.kind, 0) + 1
    return out


def _memory(mem) -> dict:
    if mem is None:
        return {}
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "total_bytes": arg + out - alias + temp}


def weight_bytes(params, compiled) -> tuple[int, int]:
    """``(all weights, the largest per-device share)`` in bytes: each weight's shard shape under the sharding the
    compiled program takes its first argument (the params) in (a weight the program does not use counts in the
    total only)."""
    pairs = []
    jax.tree.map(lambda a, sh: pairs.append((a, sh)), params, compiled.input_shardings[0][0])
    total = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a, _ in pairs)
    per_device: dict[Any, int] = {}
    for a, sh in pairs:
        if sh is None:  # an argument the program does not use (jit drops it)
            continue
        nbytes = math.prod(sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for dev in sh.device_set:
            per_device[dev] = per_device.get(dev, 0) + nbytes
    return int(total), int(max(per_device.values(), default=0))


def abstract_decode_params(cfg: ModelConfig, mesh):
    """``(graphdef, LayerMajorParams of ShapeDtypeStructs)``: the Decoder's weight layout (one buffer per layer) in
    ``cfg.dtype``, each leaf carrying the sharding the rules table gives it on ``mesh``; nothing allocated."""
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.model.layer_major import abstract_layer_major
    from tidar_jax.sharding import state_shardings

    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    # the shardings tree is a prefix of the params' (a sharding where the params hold a Variable): keep the Variables
    with_sharding = jax.tree.map(
        lambda s, var: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), var),
        shardings, abstract)
    return graphdef, abstract_layer_major(with_sharding)


def decode_options(mode: str, block_size: int, max_new_tokens: int, cache_page: int = 128,
                   head: str = "one_pass", cache_dtype: str | None = None,
                   cache_attention: str = "auto", groups: tuple[int, ...] | None = None) -> DecodeOptions:
    """The options ``Decoder.options`` builds for a greedy lossless run (AR normalised as the Decoder does)."""
    if mode == "ar":
        return DecodeOptions(mode="ar", block_size=1, max_new_tokens=max_new_tokens, cache_page=cache_page,
                             cache_dtype=cache_dtype, cache_attention=cache_attention).validate()
    return DecodeOptions(mode="tidar", block_size=block_size, max_new_tokens=max_new_tokens, head=head,
                         cache_page=cache_page, cache_dtype=cache_dtype, cache_attention=cache_attention,
                         groups=groups).validate()


def _replicated(shape, dtype, mesh):
    from tidar_jax.sharding import replicated

    return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(mesh))


def compile_decode(cfg: ModelConfig, devices, *, batch: int = 1, block_size: int = DEFAULT_BLOCK_SIZE,
                   context: int = 1024, max_new_tokens: int = 256, cache_page: int = 128, head: str = "one_pass",
                   modes=("ar", "tidar"), mesh_shape=(1, 1, 1), cache_dtype: str | None = None,
                   with_prefill: bool = True, cache_attention: str = "auto",
                   groups: tuple[int, ...] | None = None,
                   step_compiler_options: dict | None = None) -> dict[str, CompiledDecodeProgram]:
    """Compile prefill (a ``context``-token prompt per row) and one step (at live length ``context``) of each
    mode for ``devices`` (a target's deviceless devices, or real ones). ``cfg.dtype`` is the decode dtype.
    ``with_prefill=False`` compiles the steps only (the state in the layout the prefill pins it to,
    ``engine.state_shardings``).
    ``step_compiler_options``: XLA options for the steps' compiles (e.g. ``xla_dump_to``, read by
    ``tidar_jax.analysis.thunks``)."""
    from tidar_jax.sharding import make_mesh

    mesh = make_mesh(*mesh_shape, devices=list(devices)[:math.prod(mesh_shape)])
    platform = platform_of_devices(list(devices))
    graphdef, params = abstract_decode_params(cfg, mesh)
    out: dict[str, CompiledDecodeProgram] = {}
    # a Mosaic kernel lowers through the chip's description, which a deviceless compile has only from the mesh
    # (jax's default backend is the CPU); a multi-device mesh gets it from the kernels' shard_map as well
    chip_mesh = jax.set_mesh(mesh) if platform == "tpu" else contextlib.nullcontext()
    with compiling_for(platform), chip_mesh:
        for mode in modes:
            opts = decode_options(mode, block_size, max_new_tokens, cache_page, head, cache_dtype, cache_attention,
                                  groups)
            padded = prompt_bucket(context, context)
            cache_size = engine.required_cache_size(padded, opts)
            stops = engine.Stops(_replicated((EOS_CAPACITY,), jnp.int32, mesh),
                                 _replicated((STOP_CAPACITY, STOP_WINDOW), jnp.int32, mesh),
                                 _replicated((STOP_CAPACITY,), jnp.int32, mesh))
            from tidar_jax.sharding import logical_sharding

            rows = logical_sharding(("batch", None), (batch, padded), mesh)
            key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                       sharding=_replicated((), jnp.int32, mesh).sharding)
            args = (params, jax.ShapeDtypeStruct((batch, padded), jnp.int32, sharding=rows),
                    jax.ShapeDtypeStruct((batch,), jnp.int32,
                                         sharding=logical_sharding(("batch",), (batch,), mesh)), key, stops)
            prefill_fn = partial(engine.prefill, graphdef, opts, cache_size, mesh=mesh)
            t0 = time.perf_counter()
            shapes = jax.eval_shape(prefill_fn, *args)
            if with_prefill:  # the state's layout between steps is the prefill's output layout
                prefill_lowered = jax.jit(prefill_fn).lower(*args)
                prefill = prefill_lowered.compile()
                shardings = prefill.output_shardings
            else:  # the layout the prefill pins its output to
                shardings = engine.state_shardings(shapes, mesh)
            prefill_s = time.perf_counter() - t0
            state0 = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
            step_fn = partial(engine.step, graphdef, opts, mesh=mesh)
            t0 = time.perf_counter()
            lowered = jax.jit(step_fn, donate_argnums=(1,)).lower(params, state0)
            step = lowered.compile(compiler_options=step_compiler_options)
            step_s = time.perf_counter() - t0
            trips = max(1, -(-context // cache_page)) if cache_page else 1
            step_tokens = 1 if mode == "ar" else block_size * (1 + len(opts.group_counts))
            if with_prefill:
                out[f"{mode} prefill"] = CompiledDecodeProgram(f"{mode} prefill", prefill, prefill_s,
                                                               HloProgram.of(prefill), 1,
                                                               padded + (block_size if mode == "tidar" else 0),
                                                               unoptimized_hlo=prefill_lowered.as_text(dialect="hlo"))
            out[f"{mode} step"] = CompiledDecodeProgram(f"{mode} step", step, step_s, HloProgram.of(step), trips,
                                                        step_tokens, *weight_bytes(params, step),
                                                        unoptimized_hlo=lowered.as_text(dialect="hlo"))
    return out


def plan_summary(cfg: ModelConfig, programs: dict[str, CompiledDecodeProgram], *, target: str, batch: int,
                 block_size: int, context: int, cache_page: int) -> dict:
    platform = platform_of_devices([_device(programs)])
    return {
        "target": target,
        "device_kind": _device(programs).device_kind,
        "platform": platform,
        "model": {"num_params": cfg.num_params, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "dtype": cfg.dtype},
        "batch": batch, "block_size": block_size, "context": context, "cache_page": cache_page,
        "programs": {name: _without_gpu_notions(prog.summary(cfg.num_layers), platform)
                     for name, prog in programs.items()},
    }


def _without_gpu_notions(summary: dict, platform: str) -> dict:
    """A TPU program's loops run on the device: no host round trips to report."""
    if platform == "tpu":
        summary.pop("host_round_trips")
    return summary


def _device(programs):
    """A device the programs were compiled for (the first input's)."""
    prog = next(iter(programs.values()))
    return next(iter(jax.tree.leaves(prog.compiled.input_shardings)[0].device_set))


def format_plan(summary: dict) -> str:
    gib = 1024 ** 3
    m = summary["model"]
    lines = [f"decode plan: {summary['target']} ({summary['device_kind']}), {m['num_params'] / 1e9:.2f}B params "
             f"{m['dtype']}, batch {summary['batch']}, block size {summary['block_size']}, context "
             f"{summary['context']}, cache page {summary['cache_page']}"]
    for name, s in summary["programs"].items():
        mem = s["memory"]
        kinds = ", ".join(f"{k} {v}" for k, v in s["entry_kernel_kinds"].items())
        lines += [
            f"{name}: compiled in {s['compile_seconds']:.1f} s",
            f"  kernels outside loops {s['entry_kernels']} ({s['fusions']} fusions, {s['custom_calls']} custom calls):"
            f" {kinds}",
            f"  launches per run {s['launches']} ({s['launches_per_layer']:.1f} per layer), assuming "
            f"{s['assumed_dynamic_trips']} iterations per data-dependent loop",
        ]
        if "host_round_trips" in s:  # XLA:GPU's loops ask the host; a TPU's run on the device
            lines.append(f"  device-to-host round trips per run {s['host_round_trips']}")
        groups: dict[str, int] = {}  # identical loops (one per layer, typically) print once, with their count
        for lp in s["loops"]:
            trips = "dynamic (data-dependent)" if lp["dynamic"] else f"{lp['trip_count']} (known)"
            if lp["dynamic"] and summary.get("platform") == "tpu":
                trips = "not recorded (XLA:TPU's HLO carries no trip counts)"
            body = ", ".join(f"{k} {v}" for k, v in lp["body_kernel_kinds"].items())
            line = (f"while loop: trips {trips}, {lp['body_kernels']} kernels per iteration ({body}); from "
                    f"{lp['op_name'] or '?'}")
            groups[line] = groups.get(line, 0) + 1
        lines += [f"  {n} x {line}" for line, n in groups.items()]
        if s.get("weight_bytes_per_device"):
            lines.append(f"  weights per device {s['weight_bytes_per_device'] / gib:.3f} GiB of "
                         f"{s['weight_bytes'] / gib:.3f} GiB")
        if mem:
            lines.append(f"  memory per device: arguments {mem['argument_bytes'] / gib:.3f} GiB, outputs "
                         f"{mem['output_bytes'] / gib:.3f} GiB (aliased {mem['alias_bytes'] / gib:.3f}), temporaries "
                         f"{mem['temp_bytes'] / gib:.3f} GiB, total {mem['total_bytes'] / gib:.3f} GiB")
    return "\n".join(lines)


OUTER_LOOP_NOTE = ("each step also pays the generation loop's predicate: on XLA:GPU the `while_loop` of "
                   "`decode.engine.generate_loop` brings `done` to the host once per step (one host round trip)")


def _pair(ceiling_s: float, expected_s: float) -> dict:
    return {"ceiling_s": ceiling_s, "expected_s": expected_s}


def _gpu_entry(prog: CompiledDecodeProgram, chip, graph: bool, live: int | None, step: bool) -> dict:
    """The cost model's estimate of one GPU program (``time_s``: the program alone, at the ceiling), its ceiling and
    expected figures (a step's with the outer loop's round trip), and XLA's own figure where the compile recorded
    it (``analysis.xla_cost``)."""
    from tidar_jax.analysis.chips import chip_costs
    from tidar_jax.analysis.cost_model import estimate
    from tidar_jax.analysis.efficiency import expected
    from tidar_jax.analysis.xla_cost import compare

    est = estimate(prog.program, chip, prog.assumed_trips, graph=graph, live_cache_slots=live)
    exp = expected(est, chip, graph)
    outer = chip_costs(chip).host_round_trip_s if step else 0.0
    out = {**est.summary(), **_pair(exp.ceiling_s + outer, exp.expected_s + outer),
           "outer_loop_round_trip_s": outer, "expected_by_class_s": exp.expected_by_class,
           "ceiling_by_class_s": exp.ceiling_by_class}
    xla = compare(prog.program, chip, prog.assumed_trips, graph, live).totals()
    if xla["covered_kernels"]:
        out.update({"xla_s": xla["xla_s"], "xla_ours_same_kernels_s": xla["ours_s"],
                    "xla_covered_kernels": xla["covered_kernels"], "xla_not_costed_launches": xla["uncovered_launches"],
                    "xla_not_costed_kinds": xla["uncovered_kinds"]})
    return out


def _tpu_entry(prog: CompiledDecodeProgram, chip, live: int | None) -> dict:
    """A TPU program's ceiling and expected figures (``analysis.tpu_time``: trip counts from the unoptimised HLO,
    HBM traffic only, loops on the device)."""
    from tidar_jax.analysis.tpu_time import tpu_time

    t = tpu_time(prog.program, prog.unoptimized_hlo, chip, prog.assumed_trips, live_cache_slots=live)
    return {**t.summary(), "time_s": t.ceiling_s, "outer_loop_round_trip_s": 0.0}


def program_estimate(prog: CompiledDecodeProgram, chip, *, graph: bool = True, live_cache_slots: int | None = None,
                     step: bool = True) -> dict:
    """One program's estimate at both levels (``ceiling_s``, ``expected_s``): on a GPU eager or as one CUDA graph
    (``graph``), a step with the generation loop's host round trip; on a TPU one program (``graph`` unused)."""
    if chip.platform == "tpu":
        return _tpu_entry(prog, chip, live_cache_slots)
    return _gpu_entry(prog, chip, graph, live_cache_slots, step)


def _ratios(steps: dict, batch: int, tokens_per_nfe: float | None) -> dict:
    """AR tokens/s, the TiDAR/AR step ratio and the projected speedup, at the ceiling and at the expected level
    (``<name>_ceiling`` / ``<name>_expected``)."""
    out: dict[str, Any] = {}
    if tokens_per_nfe:
        out["tokens_per_nfe"] = tokens_per_nfe
    for level in ("ceiling", "expected"):
        if "ar step" in steps:
            out[f"ar_tokens_per_s_{level}"] = batch / steps["ar step"][f"{level}_s"]
        if "ar step" in steps and "tidar step" in steps:
            ratio = steps["tidar step"][f"{level}_s"] / steps["ar step"][f"{level}_s"]
            out[f"tidar_over_ar_step_{level}"] = ratio
            if tokens_per_nfe:
                out[f"tidar_tokens_per_s_{level}"] = batch * tokens_per_nfe / steps["tidar step"][f"{level}_s"]
                out[f"projected_speedup_{level}"] = tokens_per_nfe / ratio
    return out


def decode_estimates(programs: dict[str, CompiledDecodeProgram], chip, batch: int,
                     tokens_per_nfe: float | None = None, context: int | None = None) -> dict:
    """Every program's time at two levels (docs/estimates.md): ``ceiling_s`` (the cost model: datasheet peaks,
    assumptions carried) and ``expected_s`` (``analysis.efficiency``: the peaks derated by public measurements), with
    the TiDAR/AR step ratio, tokens/s and projected speedup at both. A GPU target is estimated twice, with eager
    launches (``programs``) and as one CUDA graph (``graph``); a step's figures include the generation loop's host
    round trip, and XLA's own cost model sits beside ours (``xla_s``) when the steps were compiled with
    ``analysis.xla_cost.compile_options()``. A TPU target is one program per launch (``programs`` only), timed by
    ``analysis.tpu_time``; its loops run on the device. ``context``: the live cache length of the steps, so the
    fused cache kernel is charged for the live slots it reads."""
    out: dict[str, Any] = {"platform": chip.platform}
    variants = (("programs", None),) if chip.platform == "tpu" else (("programs", False), ("graph", True))
    for key, graph in variants:
        steps = {}
        for name, prog in programs.items():
            live = context if name.endswith("step") else None
            steps[name] = program_estimate(prog, chip, graph=bool(graph), live_cache_slots=live,
                                           step=name.endswith("step"))
        out[key] = steps
        out["ratios" if key == "programs" else "graph_ratios"] = _ratios(steps, batch, tokens_per_nfe)
    if chip.platform == "gpu":
        out["outer_loop"] = OUTER_LOOP_NOTE
    return out


def format_decode_estimates(est: dict) -> str:
    tpu = est.get("platform") == "tpu"
    lines = []
    labels = ((("programs", "one TPU program"),) if tpu
              else (("programs", "eager launches"), ("graph", "one CUDA graph")))
    for key, label in labels:
        if key not in est:
            continue
        r = est["ratios"] if key == "programs" else est.get("graph_ratios", {})
        for name, s in est[key].items():
            line = (f"{name} ({label}): ESTIMATE ceiling {s['ceiling_s'] * 1e3:.3f} ms, expected "
                    f"{s['expected_s'] * 1e3:.3f} ms ({s['launches']} launches")
            if tpu:
                static = [lp["trips"] for lp in s["loops"] if lp["trips"] is not None]
                assumed = sorted({lp["assumed"] for lp in s["loops"] if lp["trips"] is None})
                trips = "/".join(str(t) for t in sorted(set(static)))
                line += (f"; loop trip counts from the unoptimised HLO: {len(static)} static"
                         + (f" ({trips} trips)" if static else "")
                         + f", {len(s['loops']) - len(static)} data-dependent"
                         + (f" ({'/'.join(map(str, assumed))} trips assumed))" if assumed else ")"))
            else:
                line += (f", {s['host_round_trips']} host round trips in the program"
                         + (", +1 for the generation loop" if s["outer_loop_round_trip_s"] else "")
                         + f", {s['flops'] / 1e9:.2f} GFLOP, {s['bytes'] / 1e9:.3f} GB)")
                if "xla_s" in s:
                    line += (f"; XLA's cost model {s['xla_s'] * 1e3:.3f} ms vs ours "
                             f"{s['xla_ours_same_kernels_s'] * 1e3:.3f} ms over the {s['xla_covered_kernels']} kernels it costs (launch excluded; "
                             f"{s['xla_not_costed_launches']} launches it does not cost)")
            lines.append(line)
        if "tidar_over_ar_step_ceiling" in r:
            lines.append(f"TiDAR step / AR step ({label}): ceiling {r['tidar_over_ar_step_ceiling']:.2f}, expected "
                         f"{r['tidar_over_ar_step_expected']:.2f}; AR tokens/s ceiling "
                         f"{r['ar_tokens_per_s_ceiling']:.0f}, "
                         f"expected {r['ar_tokens_per_s_expected']:.0f}")
        if "projected_speedup_ceiling" in r:
            lines.append(f"at {r['tokens_per_nfe']:.2f} tokens per forward ({label}): projected speedup ceiling "
                         f"{r['projected_speedup_ceiling']:.2f}x, expected {r['projected_speedup_expected']:.2f}x "
                         f"(TiDAR tokens/s {r['tidar_tokens_per_s_ceiling']:.0f} / "
                         f"{r['tidar_tokens_per_s_expected']:.0f})")
        steps = [v for k, v in est[key].items() if k.endswith("step")] or list(est[key].values())
        lines.append(f"assumptions ({label}; prefill assumes 1 iteration per data-dependent loop): "
                     f"{steps[-1]['assumptions_line']}")
    if "outer_loop" in est:
        lines.append(f"steps: {est['outer_loop']}")
    if any("xla_s" in s for s in est.get("graph", {}).values()):
        lines.append("XLA's figure is of this deviceless compile, which cannot autotune: its GEMMs keep default "
                     "Triton tiles, which XLA's model charges far below the tensor-core peak for the TiDAR step's "
                     "multi-row GEMMs; a GPU's own compile autotunes them (docs/estimates.md)")
    lines.append("ceiling: datasheet peaks; expected: peaks derated by public measurements (docs/estimates.md)")
    return "\n".join(lines)


def model_config_for_plan(preset: str | None, hf_config: str | None, dtype: str) -> ModelConfig:
    """The architecture to plan: a named shape (``tidar_jax.presets.MODEL_SHAPES``) or an HF ``config.json``."""
    from tidar_jax.config import ConfigError
    from tidar_jax.presets import MODEL_SHAPES

    if hf_config is not None:
        import json

        from tidar_jax.hf.hf_config import hf_config_to_model_config

        try:
            with open(hf_config) as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--hf-config={hf_config!r}: not a readable config.json ({type(e).__name__}: {e})")
        from tidar_jax.hf.keys import HFFormatError

        try:
            cfg = hf_config_to_model_config(hf, dtype=dtype, require_mask_token=False)
        except HFFormatError as e:
            raise ConfigError(f"--hf-config={hf_config!r}: {e}") from None
        if cfg.mask_token_id is None:  # a stock model: plan it as TiDAR trains it, with <|mask|> appended
            cfg = cfg.replace(vocab_size=cfg.vocab_size + 1, mask_token_id=cfg.vocab_size)
        if cfg.block_size is None:
            cfg = cfg.replace(block_size=DEFAULT_BLOCK_SIZE)
        return cfg.replace(dtype=dtype, param_dtype=dtype)
    if preset not in MODEL_SHAPES:
        raise ConfigError(f"--preset={preset!r}: must be one of {', '.join(MODEL_SHAPES)}")
    return ModelConfig(**{**MODEL_SHAPES[preset], "dtype": dtype, "param_dtype": dtype})


__all__ = ["CompiledDecodeProgram", "PROGRAMS", "abstract_decode_params", "compile_decode", "decode_estimates",
           "decode_options", "format_decode_estimates", "format_plan", "model_config_for_plan", "plan_summary",
           "program_estimate", "weight_bytes"]
