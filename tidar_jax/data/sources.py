"""Corpus discovery: turn source specs (dirs, globs, files, JSONL, the default CPython stdlib) into documents.

A *document* is one text file, or one JSONL record. Every input that does not become a document is accounted for:
unreadable/non-UTF-8/empty inputs land in ``skipped`` (with the reason), files a directory walk passes over because
of their extension are counted in ``ignored_extensions``, and files cut by ``max_files``/``max_bytes`` are counted in
``truncated``. Nothing disappears without a trace in the manifest.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections import Counter

# Extensions read as plain text documents (one document per file). ``.jsonl`` is read per record.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".py", ".pyi", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".go", ".rs", ".java", ".js", ".ts",
    ".json", ".toml", ".yaml", ".yml", ".sh", ".html", ".css", ".tex", ".cfg", ".ini",
})
JSONL_EXTENSION = ".jsonl"
ALLOWED_EXTENSIONS = TEXT_EXTENSIONS | {JSONL_EXTENSION}

# The default corpus: CPython stdlib modules. Tests, the IDLE tests, codec tables (encodings/) and the pydoc topic
# blobs (pydoc_data/) are left out: they are large, repetitive, and not representative code; this keeps the default
# to ~10 MB that tokenizes in well under a minute on 2 cores.
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
                        "__pycache__")
STDLIB_SUBSET = ("**/*.py under the running Python's stdlib, excluding directories named "
                 + ", ".join(STDLIB_EXCLUDED_DIRS) + " and config-* build dirs")


class DataError(ValueError):
    """Bad data input; the message names the bad value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable identity used for the held-out hash: path relative to its source root (+ "#line" for JSONL)
    path: str  # absolute path of the file it came from
    text: str


@dataclasses.dataclass
class Corpus:
    documents: list[Document]
    files_read: int  # files that yielded at least one document or were examined (text or jsonl)
    skipped: list[dict]  # {"path", "reason"}
    ignored_extensions: dict[str, int]  # extension -> count of files a directory walk/glob passed over
    truncated: dict  # {"files_not_read": n, "by": "max_files"|"max_bytes"|None}
    sources: list[dict]  # resolved description of each source spec


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _walk(root: str, skip_dir=lambda name: False) -> list[str]:
    """All files under root, sorted, skipping hidden dirs, __pycache__ and dirs for which skip_dir(name) is true."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d != "__pycache__" and not skip_dir(d))
        out.extend(os.path.join(dirpath, f) for f in filenames)
    return sorted(out)


def _skip_stdlib_dir(name: str) -> bool:
    return name in STDLIB_EXCLUDED_DIRS or name.startswith("config-")


def _glob_root(pattern: str) -> str:
    """The longest leading directory of a glob pattern that contains no magic (keys are relative to it)."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed) or "."
    return root if os.path.isdir(root) else os.path.dirname(root) or "."


def resolve_sources(sources) -> tuple[list[tuple[str, str]], dict[str, int], list[dict]]:
    """Expand source specs into ``[(abs_path, key)]`` (sorted per spec), ignored-extension counts, descriptions.

    Raises DataError for a missing path, a glob matching nothing, or an explicit file with an unknown extension.
    """
    if sources is None:
        root = stdlib_dir()
        files = [p for p in _walk(root, _skip_stdlib_dir) if _extension(p) == ".py"]
        entries = [(p, os.path.relpath(p, root).replace(os.sep, "/")) for p in files]
        return entries, {}, [{"spec": None, "kind": "stdlib", "path": root, "subset": STDLIB_SUBSET}]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not len(sources):
        raise DataError("sources=[]: give at least one directory, glob, text file or .jsonl file (or None for stdlib)")
    entries: list[tuple[str, str]] = []
    ignored: Counter = Counter()
    described = []
    for spec in sources:
        spec = os.fspath(spec)
        if _is_glob(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"source glob {spec!r} matched no files")
            root = _glob_root(spec)
            kind = "glob"
        elif os.path.isdir(spec):
            matches, root, kind = _walk(spec), spec, "dir"
        elif os.path.isfile(spec):
            if _extension(spec) not in ALLOWED_EXTENSIONS:
                raise DataError(f"source file {spec!r} has unknown extension {_extension(spec)!r}; allowed: "
                                + " ".join(sorted(ALLOWED_EXTENSIONS)))
            matches, root, kind = [spec], os.path.dirname(spec) or ".", "file"
        else:
            raise DataError(f"source {spec!r} does not exist (give a directory, glob, text file or .jsonl file)")
        used = 0
        for path in matches:
            if _extension(path) not in ALLOWED_EXTENSIONS:
                ignored[_extension(path) or "<none>"] += 1
                continue
            entries.append((os.path.abspath(path), os.path.relpath(path, root).replace(os.sep, "/")))
            used += 1
        described.append({"spec": spec, "kind": kind, "path": os.path.abspath(root), "files": used})
    return entries, dict(sorted(ignored.items())), described


def _decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if not data:
        return None, "empty file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
    if not text.strip():
        return None, "empty (whitespace only)"
    return text, None


def _jsonl_documents(path: str, key: str, text: str, skipped: list) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank separator lines are not records
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append({"path": where, "reason": f"invalid JSON ({e.msg})"})
            continue
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            skipped.append({"path": where, "reason": "JSONL record has no string field 'text'"})
            continue
        if not value.strip():
            skipped.append({"path": where, "reason": "empty text"})
            continue
        docs.append(Document(key=f"{key}#{lineno}", path=path, text=value))
    return docs


def read_corpus(sources=None, max_files: int | None = None, max_bytes: int | None = None) -> Corpus:
    """Resolve ``sources`` and read every document (in a deterministic order)."""
    for name, value in (("max_files", max_files), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"{name}={value!r}: must be an integer >= 1 or None")
    entries, ignored, described = resolve_sources(sources)
    truncated = {"files_not_read": 0, "by": None}
    if max_files is not None and len(entries) > max_files:
        truncated = {"files_not_read": len(entries) - max_files, "by": "max_files"}
        entries = entries[:max_files]
    documents: list[Document] = []
    skipped: list[dict] = []
    total_bytes = 0
    files_read = 0
    for i, (path, key) in enumerate(entries):
        if max_bytes is not None and documents and total_bytes >= max_bytes:
            truncated = {"files_not_read": truncated["files_not_read"] + len(entries) - i, "by": "max_bytes"}
            break
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            skipped.append({"path": path, "reason": f"unreadable ({e.strerror})"})
            continue
        files_read += 1
        text, reason = _decode(data)
        if text is None:
            skipped.append({"path": path, "reason": reason})
            continue
        if _extension(path) == JSONL_EXTENSION:
            new = _jsonl_documents(path, key, text, skipped)
        else:
            new = [Document(key=key, path=path, text=text)]
        documents.extend(new)
        total_bytes += sum(len(d.text.encode("utf-8")) for d in new)
    return Corpus(documents, files_read, skipped, ignored, truncated, described)


def heldout_score(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document key (sha256 of seed and key)."""
    digest = hashlib.sha256(f"tidar-heldout:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_documents(documents: list[Document], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Whole documents go to eval when their hash score is below ``heldout_fraction``.

    So that a small corpus still has both splits, a positive fraction with >= 2 documents always holds out at least
    one document (the lowest score) and keeps at least one for training (the highest score).
    """
    scores = [heldout_score(seed, d.key) for d in documents]
    is_eval = [s < heldout_fraction for s in scores]
    if heldout_fraction > 0 and len(documents) >= 2:
        if not any(is_eval):
            is_eval[min(range(len(scores)), key=scores.__getitem__)] = True
        if all(is_eval):
            is_eval[max(range(len(scores)), key=scores.__getitem__)] = False
    train = [d for d, e in zip(documents, is_eval) if not e]
    evals = [d for d, e in zip(documents, is_eval) if e]
    return train, evals
