"""Corpus discovery: turn source specs (dirs, globs, files, JSONL, the default CPython stdlib) into documents.

A *document* is one text file, or one JSONL record. Every input that does not become a document is accounted for:
unreadable/non-UTF-8/empty inputs land in ``skipped`` (with the reason), files a directory walk passes over because
of their extension are counted in ``ignored_extensions``, and files cut by ``max_files``/``max_bytes`` are counted in
``truncated``. Nothing disappears without a trace in the manifest.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections import Counter
from typing import Iterator

# Extensions read as plain text documents (one document per file). ``.jsonl`` is read per record.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".py", ".pyi", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".go", ".rs", ".java", ".js", ".ts",
    ".json", ".toml", ".yaml", ".yml", ".sh", ".html", ".css", ".tex", ".cfg", ".ini",
})
JSONL_EXTENSION = ".jsonl"
PARQUET_EXTENSION = ".parquet"
COMPRESSIONS = (".gz", ".zst")  # streamed through gzip / zstandard; the extension before them decides the kind
ALLOWED_EXTENSIONS = TEXT_EXTENSIONS | {JSONL_EXTENSION, PARQUET_EXTENSION}

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


def _compression(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in COMPRESSIONS else ""


def _extension(path: str) -> str:
    """The extension that decides how a file is read: ``a.jsonl.gz`` -> ``.jsonl.gz``, ``a.py`` -> ``.py``."""
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext in COMPRESSIONS:
        return os.path.splitext(stem)[1].lower() + ext
    return ext


def _allowed(path: str) -> bool:
    ext = _extension(path)
    compression = _compression(path)
    inner = ext[:-len(compression)] if compression else ext
    if compression and inner == PARQUET_EXTENSION:
        return False  # Parquet compresses internally
    return inner in ALLOWED_EXTENSIONS


def _kind(path: str) -> str:
    inner = _extension(path)
    compression = _compression(path)
    inner = inner[:-len(compression)] if compression else inner
    return {JSONL_EXTENSION: "jsonl", PARQUET_EXTENSION: "parquet"}.get(inner, "text")


ALLOWED_DESCRIPTION = (" ".join(sorted(ALLOWED_EXTENSIONS)) + "; text and .jsonl files may end in .gz or .zst")


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
            if not _allowed(spec):
                raise DataError(f"source file {spec!r} has unknown extension {_extension(spec)!r}; allowed: "
                                + ALLOWED_DESCRIPTION)
            matches, root, kind = [spec], os.path.dirname(spec) or ".", "file"
        else:
            raise DataError(f"source {spec!r} does not exist (give a directory, glob, text file or .jsonl file)")
        used = 0
        for path in matches:
            if not _allowed(path):
                ignored[_extension(path) or "<none>"] += 1
                continue
            entries.append((os.path.abspath(path), os.path.relpath(path, root).replace(os.sep, "/")))
            used += 1
        if not used:
            raise DataError(f"source {spec!r} holds no readable files ({len(matches)} file(s) with other "
                            f"extensions); readable: {ALLOWED_DESCRIPTION}")
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


def _open_binary(path: str):
    """A binary stream of the file's content, decompressed by extension (.gz / .zst)."""
    compression = _compression(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _corrupt(path: str, e: BaseException) -> DataError:
    kind = {".gz": "gzip", ".zst": "zstd"}.get(_compression(path), "file")
    return DataError(f"{path}: corrupt {kind} data ({type(e).__name__}: {e}); fix or remove the file")


# What a truncated or damaged compressed stream raises (gzip: BadGzipFile/EOFError/zlib.error, zstd: ZstdError).
def _decompress_errors():
    import zlib

    import zstandard

    return (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


def _text_file_documents(path: str, key: str) -> Iterator:
    try:
        with _open_binary(path) as f:
            data = f.read()
    except _decompress_errors() as e:
        raise _corrupt(path, e) from None
    except OSError as e:
        yield Skip(path, f"unreadable ({e.strerror or e})")
        return
    text, reason = _decode(data)
    if text is None:
        yield Skip(path, reason)
    else:
        yield Document(key=key, path=path, text=text)


def _record_text(record, text_field: str, where: str):
    """(text, None) or (None, skip reason) for one JSON record / Parquet value."""
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        return None, f"JSONL record has no string field {text_field!r}"
    if not value.strip():
        return None, "empty text"
    return value, None


def _jsonl_documents(path: str, key: str, text_field: str) -> Iterator:
    """One document per JSONL line (streamed line by line, never the whole file)."""
    records = with_field = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank separator lines are not records
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Skip(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Skip(where, f"invalid JSON ({e.msg})")
                    continue
                if isinstance(record, dict):
                    records += 1
                    with_field += text_field in record
                text, reason = _record_text(record, text_field, where)
                if text is None:
                    yield Skip(where, reason)
                    continue
                yield Document(key=f"{key}#{lineno}", path=path, text=text)
    except _decompress_errors() as e:
        raise _corrupt(path, e) from None
    except OSError as e:
        if _compression(path):
            raise _corrupt(path, e) from None
        yield Skip(path, f"unreadable ({e.strerror or e})")
        return
    if records and not with_field:
        raise DataError(f"{path}: none of its {records} JSON records has a string field {text_field!r}; "
                        "name the text field with --text-field NAME")


PARQUET_BATCH_ROWS = 1024


def _parquet_documents(path: str, key: str, text_field: str) -> Iterator:
    """One document per row of the text column, read in row-group batches (never the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); the file may be truncated") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); name the text column "
                        "with --text-field NAME")
    field_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise DataError(f"{path}: column {text_field!r} has type {field_type}, not a string column")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                where = f"{path}#{row}"
                if value is None:
                    yield Skip(where, f"null {text_field!r}")
                elif not value.strip():
                    yield Skip(where, "empty text")
                else:
                    yield Document(key=f"{key}#{row}", path=path, text=value)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: Parquet data cannot be read after row {row} ({e}); the file may be truncated") \
            from None


@dataclasses.dataclass(frozen=True)
class Skip:
    path: str  # file, or file:line / file#row for one record
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def file_documents(path: str, key: str, text_field: str = "text") -> Iterator:
    """The documents (and skipped records) of one input file, in order, streamed."""
    kind = _kind(path)
    if kind == "jsonl":
        return _jsonl_documents(path, key, text_field)
    if kind == "parquet":
        return _parquet_documents(path, key, text_field)
    return _text_file_documents(path, key)


def select_entries(entries: list, max_files: int | None = None, shard: tuple[int, int] = (0, 1)):
    """Apply ``max_files`` then ``--shard i/n`` (contiguous file ranges); returns (entries, truncated)."""
    truncated = {"files_not_read": 0, "by": None}
    if max_files is not None and len(entries) > max_files:
        truncated = {"files_not_read": len(entries) - max_files, "by": "max_files"}
        entries = entries[:max_files]
    index, count = shard
    lo, hi = len(entries) * index // count, len(entries) * (index + 1) // count
    return entries[lo:hi], truncated


def iter_stream(entries: list, text_field: str = "text", max_bytes: int | None = None, stats: dict | None = None):
    """Documents and Skips of ``entries`` in order; ``stats`` collects files_read / bytes / truncation by max_bytes.

    Deterministic: the same entries always give the same sequence, which is what lets a preparation resume by
    position and what keeps worker counts from changing the output.
    """
    stats = stats if stats is not None else {}
    stats.update(files_read=0, bytes=0, files_not_read_by_max_bytes=0)
    produced = False
    for i, (path, key) in enumerate(entries):
        if max_bytes is not None and produced and stats["bytes"] >= max_bytes:
            stats["files_not_read_by_max_bytes"] = len(entries) - i
            return
        stats["files_read"] += 1
        for item in file_documents(path, key, text_field):
            if isinstance(item, Document):
                produced = True
                stats["bytes"] += len(item.text.encode("utf-8"))
            yield item


def read_corpus(sources=None, max_files: int | None = None, max_bytes: int | None = None,
                text_field: str = "text") -> Corpus:
    """Resolve ``sources`` and read every document into memory (small corpora and tests; preparation streams)."""
    check_limits(max_files, max_bytes)
    entries, ignored, described = resolve_sources(sources)
    entries, truncated = select_entries(entries, max_files)
    stats: dict = {}
    documents, skipped = [], []
    for item in iter_stream(entries, text_field, max_bytes, stats):
        (documents.append(item) if isinstance(item, Document) else skipped.append(item.as_dict()))
    if stats["files_not_read_by_max_bytes"]:
        truncated = {"files_not_read": truncated["files_not_read"] + stats["files_not_read_by_max_bytes"],
                     "by": "max_bytes"}
    return Corpus(documents, stats["files_read"], skipped, ignored, truncated, described)


def check_limits(max_files, max_bytes) -> None:
    for name, value in (("max_files", max_files), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"{name}={value!r}: must be an integer >= 1 or None")


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
