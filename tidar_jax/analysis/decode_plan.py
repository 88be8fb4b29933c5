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
    unoptimized_hlo: str = ""  # the step's HLO before XLA's passes (its loops' trip counts: analysis.tpu_time)

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


def compile_decode(cfg: ModelConfig, devices, *, batch: int = 1, block_size: int = DEFAULT_BLOCK_SIZE, context: int = 1024,
                   max_new_tokens: int = 256, cache_page: int = 128, head: str = "one_pass",
                   modes=("ar", "tidar"), mesh_shape=(1, 1, 1), cache_dtype: str | None = None,
                   with_prefill: bool = True, cache_attention: str = "auto",
                   groups: tuple[int, ...] | None = None,
                   step_compiler_options: dict | None = None) -> dict[str, CompiledDecodeProgram]:
    """Compile prefill (a ``context``-token prompt per row) and one step (at live length ``context``) of each
    mode for ``devices`` (a target's deviceless devices, or real ones). ``cfg.dtype`` is the decode dtype.
    ``with_prefill=False`` compiles the steps only (the state's shardings then come from the lowered prefill).
    ``step_compiler_options``: XLA options for the steps' compiles (e.g. ``xla_dump_to``, read by
    ``tidar_jax.analysis.thunks``)."""
    from tidar_jax.sharding import make_mesh

    mesh = make_mesh(*mesh_shape, devices=list(devices)[:math.prod(mesh_shape)])
    platform = platform_of_devices(list(devices))
    graphdef, params = abstract_decode_params(cfg, mesh)
    out: dict[str, CompiledDecodeProgram] = {}
    with compiling_for(platform):
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
            if with_prefill or mesh.size > 1:  # the state's layout between steps is the prefill's output layout
                prefill = jax.jit(prefill_fn).lower(*args).compile()
                shardings = prefill.output_shardings
            else:  # one device: every layout is that device
                from tidar_jax.sharding import replicated

                shardings = jax.tree.map(lambda _: replicated(mesh), shapes)
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
                                                               padded + (block_size if mode == "tidar" else 0))
            out[f"{mode} step"] = CompiledDecodeProgram(f"{mode} step", step, step_s, HloProgram.of(step), trips,
                                                        step_tokens, lowered.as_text(dialect="hlo"))
    return out


def plan_summary(cfg: ModelConfig, programs: dict[str, CompiledDecodeProgram], *, target: str, batch: int,
                 block_size: int, context: int, cache_page: int) -> dict:
    return {
        "target": target,
        "device_kind": _device(programs).device_kind,
        "platform": platform_of_devices([_device(programs)]),
        "model": {"num_params": cfg.num_params, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "dtype": cfg.dtype},
        "batch": batch, "block_size": block_size, "context": context, "cache_page": cache_page,
        "programs": {name: prog.summary(cfg.num_layers) for name, prog in programs.items()},
    }


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
            f"  device-to-host round trips per run {s['host_round_trips']}",
        ]
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
        if mem:
            lines.append(f"  memory per device: arguments {mem['argument_bytes'] / gib:.3f} GiB, outputs "
                         f"{mem['output_bytes'] / gib:.3f} GiB (aliased {mem['alias_bytes'] / gib:.3f}), temporaries "
                         f"{mem['temp_bytes'] / gib:.3f} GiB, total {mem['total_bytes'] / gib:.3f} GiB")
    return "\n".join(lines)


def decode_estimates(programs: dict[str, CompiledDecodeProgram], chip, batch: int,
                     tokens_per_nfe: float | None = None, context: int | None = None) -> dict:
    """The cost model's estimate of every program (``tidar_jax.analysis.cost_model``; assumptions carried), the
    TiDAR/AR step-time ratio, AR tokens/s (one token per row per step) and, given a TiDAR tokens-per-forward, the
    TiDAR tokens/s and the speedup it projects. Twice: with eager launches (``programs``, the chip's launch cost)
    and with the whole program as one CUDA graph (``graph``: the in-graph launch cost, an assumption). ``context``:
    the live cache length of the steps, so the fused cache kernel is charged for the live slots it reads."""
    from tidar_jax.analysis.cost_model import estimate

    out: dict[str, Any] = {}
    for key, graph in (("programs", False), ("graph", True)):
        out[key] = {}
        for name, prog in programs.items():
            live = context if name.endswith("step") else None
            out[key][name] = estimate(prog.program, chip, prog.assumed_trips, graph=graph,
                                      live_cache_slots=live).summary()
        steps = out[key]
        ratios = out if key == "programs" else out.setdefault("graph_ratios", {})
        if "ar step" in steps:
            ratios["ar_tokens_per_s"] = batch / steps["ar step"]["time_s"]
        if "ar step" in steps and "tidar step" in steps:
            ratio = steps["tidar step"]["time_s"] / steps["ar step"]["time_s"]
            ratios["tidar_over_ar_step"] = ratio
            if tokens_per_nfe:
                ratios["tokens_per_nfe"] = tokens_per_nfe
                ratios["tidar_tokens_per_s"] = batch * tokens_per_nfe / steps["tidar step"]["time_s"]
                ratios["projected_speedup"] = tokens_per_nfe / ratio
    return out


def format_decode_estimates(est: dict) -> str:
    lines = []
    for key, label in (("programs", "eager launches"), ("graph", "one CUDA graph")):
        if key not in est:
            continue
        r = est if key == "programs" else est.get("graph_ratios", {})
        for name, s in est[key].items():
            lines.append(f"{name} ({label}): ESTIMATE {s['time_s'] * 1e3:.3f} ms ({s['launches']} launches "
                         f"{s['launch_time_s'] * 1e3:.3f} ms, {s['host_round_trips']} host round trips, "
                         f"{s['flops'] / 1e9:.2f} GFLOP, {s['bytes'] / 1e9:.3f} GB)")
        if "tidar_over_ar_step" in r:
            lines.append(f"TiDAR step / AR step ({label}): {r['tidar_over_ar_step']:.2f}; AR "
                         f"{r['ar_tokens_per_s']:.0f} tokens/s")
        if "projected_speedup" in r:
            lines.append(f"at {r['tokens_per_nfe']:.2f} tokens per forward ({label}): TiDAR "
                         f"{r['tidar_tokens_per_s']:.0f} tokens/s, projected speedup {r['projected_speedup']:.2f}x")
        steps = [v for k, v in est[key].items() if k.endswith("step")] or list(est[key].values())
        lines.append(f"assumptions ({label}; prefill assumes 1 iteration per data-dependent loop): "
                     f"{steps[-1]['assumptions_line']}")
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
        cfg = hf_config_to_model_config(hf, dtype=dtype)
        if cfg.block_size is None:
            cfg = cfg.replace(block_size=DEFAULT_BLOCK_SIZE)
        return cfg.replace(dtype=dtype, param_dtype=dtype)
    if preset not in MODEL_SHAPES:
        raise ConfigError(f"--preset={preset!r}: must be one of {', '.join(MODEL_SHAPES)}")
    return ModelConfig(**{**MODEL_SHAPES[preset], "dtype": dtype, "param_dtype": dtype})


__all__ = ["CompiledDecodeProgram", "PROGRAMS", "abstract_decode_params", "compile_decode", "decode_estimates",
           "decode_options", "format_decode_estimates", "format_plan", "model_config_for_plan", "plan_summary"]
