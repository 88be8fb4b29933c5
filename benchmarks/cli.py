"""The benchmarks' command line, in one place.

Options several benchmarks share (which model, how big a run, how many rounds, where results go, ...) are declared
once in ``SHARED``; a benchmark picks the ones it takes with ``add_shared`` (changing at most its own default or
help text) and adds only its own flags. The checks after parsing (``require_positive``, ``parse_int_list``) and the
one-line CLI exit (``fail``) live here too. Jax-free, so light scripts can use it without importing jax.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.presets import PRESETS

# Results go here unless --out says otherwise; relative, so it resolves against the directory the script runs in.
DEFAULT_OUT = os.path.join("benchmarks", "results")

SHARED: dict[str, dict] = {
    "checkpoint": dict(help="run dir / params checkpoint / HF dir (default: random-init --preset)"),
    "preset": dict(choices=sorted(PRESETS)),
    "tiny": dict(action="store_true", help="the smallest size (smoke tests)"),
    "quick": dict(action="store_true"),
    "rounds": dict(type=int),
    "reps": dict(type=int),
    "prompts": dict(type=int),
    "prompt_len": dict(type=int),
    "new_tokens": dict(type=int),
    "data": dict(help="prepared data dir for held-out prompts"),
    "seed": dict(type=int, default=0),
    "out": dict(default=DEFAULT_OUT),
}
# What a benchmark may change about a shared option: never its name, type or action.
_CHANGEABLE = {"default", "help", "required", "choices"}


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_shared(p: argparse.ArgumentParser, *names: str, **changes: dict) -> argparse.ArgumentParser:
    """Add the shared options ``names`` to ``p``, in that order; ``changes[name]`` overrides that option's
    default / help / required / choices for this benchmark."""
    for name in (*names, *changes):
        if name not in SHARED:
            raise KeyError(f"{name!r} is not a shared benchmark option; known: {', '.join(SHARED)}")
    for name, change in changes.items():
        if name not in names:
            raise KeyError(f"changes for {name!r}, which is not among the options added")
        if set(change) - _CHANGEABLE:
            raise KeyError(f"--{name}: only {', '.join(sorted(_CHANGEABLE))} may change, not {sorted(change)}")
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), **{**SHARED[name], **changes.get(name, {})})
    return p


def fail(message: str):
    """CLI exit: one line on stderr, non-zero status, no traceback."""
    raise SystemExit(f"error: {message}")


def require_positive(args, names) -> None:
    """One clear CLI error for the first option in ``names`` that is below 1 (options left unset are skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')}={value}: must be an integer >= 1")


def parse_int_list(text: str, name: str, minimum: int = 1) -> list[int]:
    """``"4,8,16"`` -> ``[4, 8, 16]``; one clear CLI error when it is not a non-empty list of integers >= minimum."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{name}={text!r}: must be a comma-separated list of integers")
    if not values or any(v < minimum for v in values):
        fail(f"{name}={text!r}: must be a non-empty comma-separated list of integers >= {minimum}")
    return values


def fill_size_defaults(args, defaults: dict, quick: dict | None = None, tiny: dict | None = None):
    """Fill every option the user left unset from the chosen size preset (--tiny, else --quick, else defaults)."""
    preset = tiny if tiny is not None and getattr(args, "tiny", False) else \
        quick if quick is not None and getattr(args, "quick", False) else defaults
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
