"""Calibration: fit the efficiency table (``tidar_jax.analysis.efficiency``) from a measured profile of a program
whose ceiling estimate we have, and write it where the estimate reads it (``efficiency.CALIBRATION_FILE``).

A profile is JSON: ``{"chip": "h100", "graph": true, "source": "...", "step_s": 0.0031, "kernels": {name: seconds
per launch}}``: each kernel's measured duration (a profiler's kernel time, averaged over launches) under the name
XLA gave it (profilers print ``gemm_fusion_dot_169`` for the HLO's ``gemm_fusion_dot.169``: both match), and
optionally the measured time of the whole step. The fit, per kernel class:

* each measured kernel informs the efficiency of the side that binds it at the ceiling: a compute-bound GEMM or
  attention kernel its class, any memory-bound kernel the memory class, a collective the collective class;
  kernels whose ceiling work is below their ceiling launch cost inform nothing (their duration is mostly fixed cost);
* efficiency = sum of ceiling work / sum of measured time over those kernels (launches counted), at most 1;
* launch: with ``step_s`` and every ceiling kernel measured, (step - sum of kernel durations) / launches, the
  in-graph or eager class as the profile says.

The accelerator suite calls ``calibrate`` after its timed runs; the calibrated entries then replace the published
ones for that chip in every expected figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from tidar_jax.analysis.efficiency import (CALIBRATION_FILE, COLLECTIVE, LAUNCH_EAGER, LAUNCH_GRAPH, MEMORY,
                                           CeilingKernel, Entry)
from tidar_jax.targets import CHIPS


class ProfileError(ValueError):
    """A profile that cannot calibrate (unknown chip, no kernels, a non-positive time)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    chip: str
    graph: bool
    source: str
    kernels: dict[str, float]  # name -> measured seconds per launch
    step_s: float | None = None


def load_profile(path: str) -> Profile:
    with open(path) as f:
        doc = json.load(f)
    chip = doc.get("chip")
    if chip not in CHIPS:
        raise ProfileError(f"profile {path}: chip {chip!r} is unknown; allowed: {', '.join(CHIPS)}")
    kernels = {str(k): float(v) for k, v in (doc.get("kernels") or {}).items()}
    if not kernels:
        raise ProfileError(f"profile {path}: no kernels; allowed: a 'kernels' map of kernel name -> seconds")
    bad = next((k for k, v in kernels.items() if not v > 0), None)
    if bad is not None:
        raise ProfileError(f"profile {path}: kernel {bad!r} time {kernels[bad]!r}; allowed: seconds > 0")
    step = doc.get("step_s")
    return Profile(chip, bool(doc.get("graph", True)), str(doc.get("source", path)), kernels,
                   float(step) if step is not None else None)


def _key(name: str) -> str:
    return name.replace(".", "_")


def fit(ceiling: list[CeilingKernel], profile: Profile) -> dict[str, Entry]:
    """Efficiency entries fitted from ``profile`` against the ``ceiling`` kernels of the program it measured."""
    measured = {_key(k): v for k, v in profile.kernels.items()}
    work: dict[str, float] = {}
    took: dict[str, float] = {}
    count: dict[str, int] = {}
    matched_s, matched_runs, unmatched = 0.0, 0, 0
    for k in ceiling:
        t = measured.get(_key(k.name))
        if t is None:
            unmatched += 1
            continue
        matched_s += t * k.runs
        matched_runs += k.runs
        side = max(k.compute_s, k.memory_s)
        if side < k.launch_s:
            continue
        if k.cls == COLLECTIVE:
            cls = COLLECTIVE
        elif k.cls != MEMORY and k.compute_s >= k.memory_s:
            cls = k.cls
        else:
            cls = MEMORY
        work[cls] = work.get(cls, 0.0) + side * k.runs
        took[cls] = took.get(cls, 0.0) + t * k.runs
        count[cls] = count.get(cls, 0) + 1
    out: dict[str, Entry] = {}
    for cls in work:
        out[cls] = Entry(min(work[cls] / took[cls], 1.0),
                         f"calibrated from {profile.source}: {count[cls]} kernels, ceiling work "
                         f"{work[cls] * 1e6:.1f} us "
                         f"vs measured {took[cls] * 1e6:.1f} us", "")
    if profile.step_s is not None and unmatched == 0 and matched_runs:
        gap = (profile.step_s - matched_s) / matched_runs
        if gap > 0:
            cls = LAUNCH_GRAPH if profile.graph else LAUNCH_EAGER
            out[cls] = Entry(gap, f"calibrated from {profile.source}: (step {profile.step_s * 1e3:.3f} ms - kernels "
                                  f"{matched_s * 1e3:.3f} ms) / {matched_runs} launches", "")
    return out


def write(chip: str, entries: dict[str, Entry], path: str = CALIBRATION_FILE) -> None:
    """Merge ``entries`` for ``chip`` into the calibration file (other chips' and classes' entries kept), atomically."""
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc.setdefault(chip, {}).update({cls: {"value": e.value, "source": e.source, "url": e.url}
                                     for cls, e in entries.items()})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def calibrate(ceiling: list[CeilingKernel], profile_path: str, path: str = CALIBRATION_FILE) -> dict[str, Entry]:
    """Fit from the profile at ``profile_path`` and write the entries for its chip; returns them."""
    profile = load_profile(profile_path)
    entries = fit(ceiling, profile)
    if not entries:
        raise ProfileError(f"profile {profile_path}: none of its {len(profile.kernels)} kernels names a kernel of the "
                           f"program ({len(ceiling)} kernels); allowed: the compiled program's kernel names")
    write(profile.chip, entries, path)
    return entries


__all__ = ["Profile", "ProfileError", "calibrate", "fit", "load_profile", "write"]
