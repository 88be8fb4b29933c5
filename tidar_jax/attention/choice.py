"""Which attention kernel runs where: the one owner of both choices, per backend ("gpu", "tpu", "cpu").

**Training attention** (``model.attention``): a named kernel is checked against the backend (a kernel that needs
particular hardware registers why it cannot run elsewhere) and ``auto`` is the first usable kernel of:

* TPU: ``splash`` (Pallas Mosaic, block-sparse), then ``blockwise``; CPU: ``blockwise``;
* GPU: the recorded ranking for the chip being built for (``targets.build_chip()``) in ``gpu_ranking.json``, which
  ships beside this module, else ``GPU_FALLBACK``. The table holds per chip the cost model's estimate of each
  kernel's forward + backward (``python -m benchmarks.attention_kernels --rank h100 h200 a100 b200``) or, once a
  lent device has timed the kernels, that measurement, taken into the table on purpose
  (``python -m benchmarks.attention_kernels --record-measured accelerator.json``). No results file of a checkout
  is read at run time. The table is read when a kernel is resolved (trace time, never inside a traced
  computation), so resolving costs no recompile.

``blockwise`` (a scan over key tiles) runs everywhere, so it closes every order.

**Decode cache attention** (``DecodeOptions.cache_attention``, one of ``config.CACHE_ATTENTION``): how a decode
step reads the KV cache. ``auto`` is ``CACHE_AUTO``: on GPU and TPU one fixed-shape kernel per layer that reads the cache in
place and skips the slots past each row's live length (GPU: ``fused``, split-K Pallas Triton,
``attention.fused_cache``; TPU: ``tpu``, Pallas Mosaic, ``attention.tpu_cache``), since ``paged``'s while loop over
live pages is a data-dependent loop in the step (on XLA:GPU it copies its predicate to the host every page); on
CPU ``paged`` (``attention.paged``: a loop iteration costs nothing extra there and it reads only live pages; the
Pallas kernels would run in interpret mode). ``dense`` is the reference: the whole allocated cache
and the step's keys under a materialised boolean mask, attended by the reference kernel.

docs/attention.md has the table of which kernel runs on which hardware and why.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from tidar_jax.config import ATTENTION_KERNELS, ConfigError
from tidar_jax.targets import build_chip, build_platform, platform_kind

TRAIN_AUTO = {"tpu": ("splash", "blockwise"), "cpu": ("blockwise",)}
GPU_FALLBACK = ("pallas_gpu", "blockwise")  # block-sparse fused first; the tile scan always runs
RANKING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_ranking.json")

CACHE_AUTO = {"gpu": "fused", "tpu": "tpu", "cpu": "paged"}

KERNELS: dict[str, Callable] = {}
UNAVAILABLE: dict[str, Callable[[str], str | None]] = {}


def register(name: str, fn: Callable, unavailable: Callable[[str], str | None] | None = None) -> None:
    """Make ``fn(q_NTHD, k_NSKD, v_NSKD, layout) -> out_NTHD`` available as ``model.attention=name``;
    ``unavailable(backend)`` returns why it cannot run on that backend (None when it can)."""
    if name not in ATTENTION_KERNELS or name == "auto":
        raise ValueError(f"kernel name {name!r}: must be one of {', '.join(ATTENTION_KERNELS[1:])}")
    KERNELS[name] = fn
    if unavailable is not None:
        UNAVAILABLE[name] = unavailable


def _backend(backend: str | None) -> str:
    """``backend``'s platform kind, default the platform being built for (``targets.build_platform()``: jax's
    default backend, or a deviceless target's platform)."""
    return platform_kind(backend or build_platform())


def resolve(kernel: str, backend: str | None = None) -> str:
    """The registered training-attention kernel that ``kernel`` (a ``model.attention`` value) means on
    ``backend``; raises one ``ConfigError`` line for a kernel that cannot run there."""
    kind = _backend(backend)
    if kernel == "auto":
        return next(name for name in auto_preference(kind) + ("blockwise",)
                    if name in KERNELS and _reason(name, kind) is None)
    if kernel not in KERNELS:
        if kernel in ATTENTION_KERNELS:
            raise ConfigError(f"model.attention={kernel!r}: not available in this build; available: auto, "
                              f"{', '.join(sorted(KERNELS))}")
        raise ConfigError(f"model.attention={kernel!r}: must be one of {', '.join(ATTENTION_KERNELS)}")
    reason = _reason(kernel, kind)
    if reason is not None:
        raise ConfigError(reason)
    return kernel


def auto_preference(kind: str) -> tuple[str, ...]:
    """The kernels ``auto`` tries, in order, on backend ``kind`` ("gpu", "tpu", "cpu") for the chip being built
    for; ``preference`` says where a GPU order comes from."""
    if kind == "gpu":
        return preference(build_chip())[0]
    return TRAIN_AUTO.get(kind, ("blockwise",))


def _reason(name: str, kind: str) -> str | None:
    check = UNAVAILABLE.get(name)
    return None if check is None else check(kind)


def resolve_cache_attention(name: str, backend: str | None = None) -> str:
    """The decode cache attention ("paged", "fused", "dense") that ``name`` (one of ``CACHE_ATTENTION``) means on
    ``backend`` (default: the platform being built for)."""
    return CACHE_AUTO.get(_backend(backend), "paged") if name == "auto" else name


def cache_read(layout, cache_attention: str, cache_page: int):
    """A decode step's ``masks.DecodeLayout`` as the chosen cache attention reads it: in place
    (``cache_page`` slots per page, the ``paged`` or ``fused`` kernel) or, for ``dense``, the materialised boolean
    mask over ``[cache | step]`` keys (attended by the reference kernel). Resolved at trace time."""
    import dataclasses

    kind = resolve_cache_attention(cache_attention)
    if kind == "dense":
        return layout.block()
    return dataclasses.replace(layout, cache_page=cache_page, cache_kernel=kind)


def _load(path: str) -> dict | None:
    """The JSON at ``path`` (None when there is none or it does not parse)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ranked_order(ranking: dict | None, chip: str | None) -> tuple[str, ...] | None:
    """The recorded ranking for ``chip`` from a ``gpu_ranking.json`` record (None when it has none)."""
    if not isinstance(ranking, dict) or chip is None:
        return None
    entry = ranking.get("chips", {}).get(chip)
    return tuple(entry["ranking"]) if entry and entry.get("ranking") else None


def preference(chip: str | None, ranking_path: str | None = None) -> tuple[tuple[str, ...], str]:
    """``(kernels in order of preference, where the order comes from)`` for training attention on ``chip``
    (a ``targets.CHIPS`` name; None: unknown), from the recorded table (default ``RANKING_FILE``)."""
    ranking_path = ranking_path or RANKING_FILE
    record = _load(ranking_path)
    order = ranked_order(record, chip)
    if order:
        entry = record["chips"][chip]
        how = entry.get("measured_on") and f"measured on {entry['measured_on']}" or f"cost model estimate for {chip}"
        return order, f"{how} ({os.path.basename(ranking_path)})"
    return GPU_FALLBACK, "fixed order (no recorded ranking for this chip)"


def ranking_record(estimates: dict[str, dict[str, float | str]], command: str, shape: dict,
                   assumptions: dict[str, str]) -> dict:
    """The ``gpu_ranking.json`` record: per chip, each kernel's estimated seconds (a string: why it has none) and
    the kernels with an estimate, fastest first."""
    chips = {}
    for chip, per_kernel in estimates.items():
        timed = {k: v for k, v in per_kernel.items() if isinstance(v, (int, float))}
        chips[chip] = {"ranking": sorted(timed, key=timed.get), "estimate_s": per_kernel,
                       "assumptions": assumptions.get(chip)}
    return {"what": "per chip, GPU training attention kernels fastest first: ESTIMATED forward + backward time (the "
                    "cost model, tidar_jax/analysis/cost_model.py, on programs compiled deviceless for each chip), "
                    "or a measurement recorded with --record-measured; model.attention=auto on a GPU takes the "
                    "ranking of its chip (tidar_jax/attention/choice.py)",
            "command": command, "shape": shape, "chips": chips}


def write_ranking(record: dict, path: str | None = None) -> None:
    """Replace the table at ``path`` (default ``RANKING_FILE``) with ``record``, atomically."""
    from tidar_jax.checkpoint.atomic import write_text

    write_text(path or RANKING_FILE, json.dumps(record, indent=1) + "\n")


__all__ = ["CACHE_AUTO", "GPU_FALLBACK", "KERNELS", "RANKING_FILE", "TRAIN_AUTO", "UNAVAILABLE",
           "auto_preference", "cache_read", "preference", "ranked_order", "ranking_record", "register", "resolve",
           "resolve_cache_attention", "write_ranking"]
