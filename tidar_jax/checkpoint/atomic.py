"""Crash safety for everything this project writes: a file or a directory appears whole under its final name, or
not at all (written beside its final name, then renamed in one step)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_dir(out_dir: str, enabled: bool = True):
    """Yield a fresh temp dir beside ``out_dir`` to fill; it is renamed to ``out_dir`` when the block completes
    and removed when it raises (including KeyboardInterrupt). ``out_dir`` must not exist yet (checked once, up
    front, by ``tidar_jax.output_paths.check_new_dir``). ``enabled=False`` (the processes of a multi-process
    job that do not write) yields None and writes nothing."""
    if not enabled:
        yield None
        return
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temp file in the same directory, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", dir=os.path.dirname(os.path.abspath(dst)))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
