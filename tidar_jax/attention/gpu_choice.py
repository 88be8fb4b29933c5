"""What ``model.attention=auto`` means for training attention on an NVIDIA GPU: the one owner of that choice.

The kernels are ranked, for the chip being built for (``targets.build_chip()``), by the first of:

1. **measurement**: the accelerator suite's ``attention_kernels`` section (``python -m benchmarks.accelerator``,
   or ``python -m benchmarks.attention_kernels`` alone) for this chip, read from ``$TIDAR_ATTENTION_MEASURED``
   when set, else ``benchmarks/results/accelerator/accelerator.json`` of the checkout when present: the kernels
   that ran, fastest forward + backward first (summed over the sequence lengths every one of them ran), then
   those that did not run in the fallback order, then those that failed;
2. **the cost model**: ``gpu_ranking.json`` beside this module, written by ``python -m benchmarks.attention_kernels
   --rank`` (the cost model's estimate of the same forward + backward, compiled deviceless for each chip);
3. **the fixed order** ``FALLBACK``.

Files are read when a kernel is resolved (at trace time, never inside a traced computation), so resolving costs no
recompile. ``resolve`` in ``tidar_jax.attention`` then takes the first
kernel of the ranking that the backend can run.
"""

from __future__ import annotations

import json
import math
import os

FALLBACK = ("pallas_gpu", "blockwise")  # block-sparse fused first; the tile scan always runs
MEASURED_ENV = "TIDAR_ATTENTION_MEASURED"
MEASURED_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks", "results", "accelerator", "accelerator.json")
RANKING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_ranking.json")

def _load(path: str | None) -> dict | None:
    """The JSON at ``path`` (None when there is none or it does not parse). Read on every resolve: a few small
    reads per trace, and never stale (a cache keyed on modification time can miss a rewrite within the
    filesystem's timestamp granularity)."""
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _section(data: dict | None) -> dict | None:
    """The attention section: inside the suite's ``accelerator.json``, or a standalone ``attention_kernels.json``."""
    if not isinstance(data, dict):
        return None
    if "sections" in data:
        sec = data["sections"].get("attention_kernels") or {}
        return sec if sec.get("status") == "ok" else None
    return data if "rows" in data else None


def measured_order(section: dict, chip: str | None) -> tuple[str, ...] | None:
    """The ranking the measurement gives for ``chip`` (None when the section is for another chip or ran
    nothing): kernels that ran, fastest forward + backward first; then the fallback kernels it has no time for;
    then kernels that only failed there."""
    if chip is None or section.get("chip") != chip:
        return None
    times: dict[str, dict[int, float]] = {}
    failed = set()
    for row in section.get("rows", []):
        if isinstance(row.get("fwd_bwd_s"), (int, float)) and math.isfinite(row["fwd_bwd_s"]):
            times.setdefault(row["kernel"], {})[row["seq_len"]] = row["fwd_bwd_s"]
        elif "error" in row:
            failed.add(row["kernel"])
    if not times:
        return None
    common = set.intersection(*(set(t) for t in times.values()))
    if not common:  # no sequence length every kernel ran: compare the longest each ran (a coarser ranking)
        total = {k: t[max(t)] for k, t in times.items()}
    else:
        total = {k: sum(t[s] for s in common) for k, t in times.items()}
    ran = tuple(sorted(total, key=total.get))
    failed -= set(ran)
    rest = tuple(k for k in FALLBACK if k not in ran and k not in failed)
    return ran + rest + tuple(sorted(failed))


def ranked_order(ranking: dict | None, chip: str | None) -> tuple[str, ...] | None:
    """The cost model's ranking for ``chip`` from a ``gpu_ranking.json`` record (None when it has none)."""
    if not isinstance(ranking, dict) or chip is None:
        return None
    entry = ranking.get("chips", {}).get(chip)
    return tuple(entry["ranking"]) if entry and entry.get("ranking") else None


def preference(chip: str | None, measured_path: str | None = None,
               ranking_path: str | None = None) -> tuple[tuple[str, ...], str]:
    """``(kernels in order of preference, where the order comes from)`` for training attention on ``chip``
    (a ``targets.CHIPS`` name; None: unknown). Paths default to ``$TIDAR_ATTENTION_MEASURED`` or
    ``MEASURED_DEFAULT``, and ``RANKING_FILE``."""
    measured_path = measured_path or os.environ.get(MEASURED_ENV) or MEASURED_DEFAULT
    section = _section(_load(measured_path))
    order = measured_order(section, chip) if section else None
    if order:
        return order, f"measured on {section.get('device')} ({measured_path})"
    ranking_path = ranking_path or RANKING_FILE
    order = ranked_order(_load(ranking_path), chip)
    if order:
        return order, f"cost model estimate for {chip} ({ranking_path})"
    return FALLBACK, "fixed order (no measurement or cost-model ranking for this chip)"


def ranking_record(estimates: dict[str, dict[str, float | str]], command: str, shape: dict,
                   assumptions: dict[str, str]) -> dict:
    """The ``gpu_ranking.json`` record: per chip, each kernel's estimated seconds (a string: why it has none) and
    the kernels with an estimate, fastest first."""
    chips = {}
    for chip, per_kernel in estimates.items():
        timed = {k: v for k, v in per_kernel.items() if isinstance(v, (int, float))}
        chips[chip] = {"ranking": sorted(timed, key=timed.get), "estimate_s": per_kernel,
                       "assumptions": assumptions.get(chip)}
    return {"what": "ESTIMATED forward + backward time of each GPU training attention kernel (the cost model, "
                    "tidar_jax/compiled/cost_model.py, on programs compiled deviceless for each chip; not a "
                    "measurement); model.attention=auto on a GPU takes the ranking of its chip until the "
                    "accelerator suite has measured it (tidar_jax/attention/gpu_choice.py)",
            "command": command, "shape": shape, "chips": chips}


def write_ranking(record: dict, path: str = RANKING_FILE) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # never half-written


__all__ = ["FALLBACK", "MEASURED_DEFAULT", "MEASURED_ENV", "RANKING_FILE", "measured_order", "preference",
           "ranked_order", "ranking_record", "write_ranking"]
