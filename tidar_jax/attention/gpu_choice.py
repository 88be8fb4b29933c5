"""What ``model.attention=auto`` means for training attention on an NVIDIA GPU: the one owner of that choice.

The kernels are ranked, for the chip being built for (``targets.build_chip()``), by the recorded table
``gpu_ranking.json`` that ships beside this module, else by the fixed order ``FALLBACK``. The table holds, per
chip, either the cost model's estimate of each kernel's forward + backward (written by
``python -m benchmarks.attention_kernels --rank h100 h200 a100 b200``) or, once a lent device has timed the
kernels, that measurement: ``python -m benchmarks.attention_kernels --record-measured accelerator.json`` takes the
accelerator suite's attention section into the table (the deliberate step; nothing in a checkout's results
folder is read at run time). The table is read when a kernel is resolved (at trace time, never inside a traced
computation), so resolving costs no recompile; ``resolve`` in ``tidar_jax.attention`` then takes the first kernel
of the ranking that the backend can run.
"""

from __future__ import annotations

import json
import os

FALLBACK = ("pallas_gpu", "blockwise")  # block-sparse fused first; the tile scan always runs
RANKING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_ranking.json")


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
    return FALLBACK, "fixed order (no recorded ranking for this chip)"


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
                    "ranking of its chip (tidar_jax/attention/gpu_choice.py)",
            "command": command, "shape": shape, "chips": chips}


def write_ranking(record: dict, path: str | None = None) -> None:
    """Replace the table at ``path`` (default ``RANKING_FILE``) with ``record``, atomically."""
    from tidar_jax.checkpoint.atomic import write_text

    write_text(path or RANKING_FILE, json.dumps(record, indent=1) + "\n")


__all__ = ["FALLBACK", "RANKING_FILE", "preference", "ranked_order", "ranking_record", "write_ranking"]
