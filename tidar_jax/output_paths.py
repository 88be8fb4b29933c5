"""Output locations, checked once, up front, by every CLI (train's run dir, prepare's output, import/export
targets) before any work starts: a path that is a file, a path under a file, a read-only or full location, or a
damaged existing directory is an ``OutputPathError`` whose one line names the path and the problem.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Callable

_PROBE_BYTES = 4096  # written and synced by the probe, so a full disk is found now and not halfway through


class OutputPathError(ValueError):
    """An output location that cannot be written; the message names the path and the problem."""


class OutputExistsError(OutputPathError, FileExistsError):
    """The output must be a new directory and the path is taken."""


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(directory: str, path: str) -> None:
    """Create, fill and remove a small file in ``directory``: the only test that holds for every user (root
    passes permission checks such as ``os.access`` that a read-only mount still refuses) and for a full disk."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write there ({directory} is {_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write there ({directory} is {_reason(e)})") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "full"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "read-only"
    return f"not writable: {e.strerror or e}"


def check_output_dir(path: str, existing: Callable[[str], str | None] | None = None) -> str:
    """The absolute path of an output directory that can be written.

    ``existing=None``: the directory must not exist yet (it is written atomically in one piece).
    ``existing=fn``: an existing directory is reused (resumed) unless ``fn(path)`` names a problem with it.
    Raises ``OutputPathError`` (one line) for a file, a path under a file, a read-only or full location, or a
    damaged existing directory.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise OutputPathError(f"{path}: is a file, not a directory")
    base = _nearest_existing(path)
    if base != path and not os.path.isdir(base):
        raise OutputPathError(f"{path}: lies under {base}, which is a file")
    if base == path:
        if existing is None:
            raise OutputExistsError(f"{path}: already exists; choose a new path or remove it first")
        problem = existing(path)
        if problem:
            raise OutputPathError(f"{path}: {problem}")
    _probe_writable(base, path)
    return path


def check_output_file(path: str) -> str:
    """The absolute path of an output file that can be written (replaced if it exists): ``OutputPathError`` (one
    line) for a directory, a path under a file, or a read-only or full location. Nothing is created."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputPathError(f"{path}: is a directory, not a file")
    base = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(base):
        raise OutputPathError(f"{path}: lies under {base}, which is a file")
    _probe_writable(base, path)
    return path


def check_new_dir(path: str) -> str:
    """``check_output_dir`` for a directory that must not exist yet."""
    return check_output_dir(path)
