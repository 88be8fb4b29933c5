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


def write_file(path: str, write, binary: bool = False) -> str:
    """Replace ``path`` with what ``write(f)`` writes into an open file, atomically (a temp file in the same
    directory, then ``os.replace``); the directory is created when missing. Returns ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def remove_write_leftovers(directory: str) -> None:
    """Delete the temp files that a process killed inside ``write_file`` or ``copy_file`` left in ``directory``
    (their names start with a dot; this project never publishes a dot file)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") and os.path.isfile(path):
            os.remove(path)


def write_text(path: str, text: str) -> str:
    """Replace ``path`` with ``text`` atomically."""
    return write_file(path, lambda f: f.write(text))


def write_json(path: str, value, indent: int = 2, default=None) -> str:
    """Replace ``path`` with ``value`` as JSON (and a final newline) atomically."""
    return write_text(path, json.dumps(value, indent=indent, default=default) + "\n")


def publish_dir(tmp: str, out_dir: str, replace: bool = False) -> bool:
    """Rename the filled directory ``tmp`` onto ``out_dir`` in one step; False (``tmp`` left as it is) when
    ``out_dir`` exists and is not empty. ``replace``: an existing ``out_dir`` is moved aside first and removed after.
    (rename(2) atomically replaces a missing or empty directory.)"""
    if replace and os.path.isdir(out_dir):
        old = f"{tmp}.old"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out_dir)
    except OSError:
        return False
    return True


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
