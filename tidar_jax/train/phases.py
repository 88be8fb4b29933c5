"""Training phases: the paper's recipe (an AR model first, then TiDAR continual pretraining from it) in one preset.

A preset may end with a ``phases`` list. Its other sections are the base every phase starts from (and what
``load_config`` returns: the preset trained from scratch in one run). Each phase names itself and lists dotted
overrides; ``init_from: <earlier phase>`` starts it from that phase's final params (``model.init_from``)::

    phases:
      - name: ar
        train.objective: ar
        train.steps: 600
      - name: tidar
        init_from: ar
        train.steps: 200
        optim.lr: 1.0e-3

The last phase trains in the run dir itself (so ``decode.py``, the demo and ``convert`` read the run dir as
before); an earlier phase trains in ``<run dir>/phases/<name>``. Overrides on the command line apply to every
phase; ``<phase>.section.key=value`` applies to one phase. Re-running the command skips a phase that finished (or
whose successor started) and resumes the first unfinished one.
"""

from __future__ import annotations

import dataclasses
import os
import re

from tidar_jax.config import ConfigError
from tidar_jax.train.config import TrainConfig, apply_overrides, split_override, from_dict, read_preset

PHASES_DIR = "phases"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str | None  # None: a preset without phases (one run)
    run_dir: str | None
    cfg: TrainConfig


def split_phases(values: dict) -> tuple[dict, list[dict] | None]:
    """``(base sections, phase entries or None)`` of a preset's parsed YAML; checks the entries' shape."""
    values = dict(values)
    phases = values.pop("phases", None)
    if phases is None:
        return values, None
    if not isinstance(phases, list) or not phases or not all(isinstance(p, dict) for p in phases):
        raise ConfigError(f"phases={phases!r}: must be a non-empty list of mappings (name, init_from, section.key)")
    seen: list[str] = []
    for p in phases:
        name = p.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in seen:
            raise ConfigError(f"phases: name={name!r}: each phase needs a distinct lower-case name "
                              "(letters, digits, _ or -, starting with a letter)")
        src = p.get("init_from")
        if src is not None and src not in seen:
            raise ConfigError(f"phases: {name}.init_from={src!r}: must name an earlier phase "
                              f"({', '.join(seen) or 'none before it'})")
        bad = [k for k in p if k not in ("name", "init_from") and k.count(".") != 1]
        if bad:
            raise ConfigError(f"phases: {name}: key(s) {bad} must be section.key (e.g. train.steps)")
        seen.append(name)
    return values, phases


def phase_dir(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, PHASES_DIR, name)


def load_phases(path: str | None, overrides=(), run_dir: str | None = None, steps: int | None = None) -> list[Phase]:
    """The preset's phases as validated configs, in order (one unnamed phase for a preset without ``phases``).

    ``overrides``: ``section.key=value`` (every phase) or ``<phase>.section.key=value`` (that phase).
    ``steps``: the last phase's ``train.steps`` (``train.py --steps``: train the final model longer)."""
    base, entries = split_phases(read_preset(path))
    overrides = list(overrides)
    if entries is None:
        overrides += [f"train.steps={steps}"] if steps is not None else []
        return [Phase(None, run_dir, from_dict(apply_overrides(base, overrides)))]
    names = [p["name"] for p in entries]
    overrides += [f"{names[-1]}.train.steps={steps}"] if steps is not None else []
    common, own = [], {n: [] for n in names}
    for text in overrides:
        key, value = split_override(text)
        head = key.split(".", 1)[0]
        if key.count(".") == 2 and head in own:
            own[head].append((key.split(".", 1)[1], value))
        elif key.count(".") == 2:
            raise ConfigError(f"override {key!r}: {head!r} is not a phase of {path}; phases: {', '.join(names)}")
        else:
            common.append((key, value))
    from_dict(apply_overrides(base, dict(common)))  # a bad shared value: its own line, not blamed on a phase
    root = run_dir if run_dir is not None else "<run-dir>"
    dirs = {n: (root if i == len(names) - 1 else phase_dir(root, n)) for i, n in enumerate(names)}
    out = []
    for p in entries:
        name = p["name"]
        values = apply_overrides(base, {k: v for k, v in p.items() if k not in ("name", "init_from")})
        values = apply_overrides(values, dict(common))
        if p.get("init_from"):
            values = apply_overrides(values, {"model.init_from": os.path.abspath(dirs[p["init_from"]])
                                               if run_dir is not None else dirs[p["init_from"]]})
        values = apply_overrides(values, dict(own[name]))
        try:
            cfg = from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"phase {name}: {e}") from None
        out.append(Phase(name, dirs[name], cfg))
    return out


def newest_step(run_dir: str) -> int | None:
    """The step of the run dir's newest checkpoint, or None when it has none."""
    from tidar_jax.checkpoint.run import run_and_steps

    try:
        _, steps = run_and_steps(run_dir)
    except FileNotFoundError:
        return None
    return int(os.path.basename(steps[0]))


def phase_done(phases: list[Phase], i: int) -> bool:
    """An earlier phase is done when it reached its steps, or when a later phase has started from it."""
    step = newest_step(phases[i].run_dir)
    if step is not None and step >= phases[i].cfg.train.steps:
        return True
    return any(newest_step(p.run_dir) is not None for p in phases[i + 1:])


def run_phases(phases: list[Phase], show_progress: bool = True, report=print) -> list:
    """Train every phase in order (skipping done ones); returns ``[(phase, RunResult or None), ...]``.
    ``report(phase, result)`` is called after each trained phase (train.py prints its summary)."""
    from tidar_jax.checkpoint.run import run_dir_problem
    from tidar_jax.output_paths import check_output_dir
    from tidar_jax.train.loop import train

    for phase in reversed(phases):  # every output location up front, the run dir first: nothing trains for nothing
        check_output_dir(phase.run_dir, existing=run_dir_problem)
    # the directories this call will create: a failure before a phase has checkpointed anything leaves none behind
    new_dirs = _missing_dirs([p.run_dir for p in phases])
    try:
        return _run(phases, show_progress, report, train)
    except BaseException:
        _remove_unused(new_dirs)
        raise


def _missing_dirs(paths: list[str]) -> list[str]:
    """The directories of ``paths`` and above them that do not exist yet, outermost first."""
    out: list[str] = []
    for path in paths:
        d, chain = os.path.abspath(path), []
        while not os.path.exists(d) and d not in out:
            chain.append(d)
            d = os.path.dirname(d)
        out += reversed(chain)
    return out


def _remove_unused(dirs: list[str]) -> None:
    """Remove those of ``dirs`` (created by this run) that hold no checkpoint, innermost first."""
    import shutil

    for d in reversed(dirs):
        if os.path.isdir(d) and not any("checkpoints" in names and os.listdir(os.path.join(root, "checkpoints"))
                                        for root, names, _ in os.walk(d)):
            shutil.rmtree(d, ignore_errors=True)


def _run(phases: list[Phase], show_progress: bool, report, train) -> list:
    out = []
    for i, phase in enumerate(phases):
        last = i == len(phases) - 1
        if phase.name is not None:
            what = "from " + phase.cfg.model.init_from if phase.cfg.model.init_from else "from scratch"
            head = f"phase {i + 1}/{len(phases)} '{phase.name}' ({phase.cfg.train.objective}, {what}) in {phase.run_dir}"
            if not last and phase_done(phases, i):
                print(f"{head}: done (step {newest_step(phase.run_dir)}), skipped", flush=True)
                out.append((phase, None))
                continue
            print(head, flush=True)
        result = train(phase.cfg, phase.run_dir, show_progress)
        report(phase, result)
        out.append((phase, result))
    return out
