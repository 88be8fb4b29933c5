"""Corpus preparation, streamed: tokenize once into sharded memory-mappable token files plus a manifest.

Layout of a prepared ``out_dir`` (format 2; built in ``.<name>.partial`` next to it, then renamed into place):
  manifest.json          settings, fingerprints, tokenizer info, per-split shards and counts, skipped inputs
  tokenizer.json         the tokenizer every id refers to
  {split}-{k:05d}.bin    token ids (uint16 if vocab < 65536 else uint32); every document is followed by one eos
  {split}-{k:05d}.docs   int64 pairs per document: offset in its shard, token count (without the eos)
  documents.jsonl        one line per document: key, source path, split, offset in its split stream, token count

Memory does not grow with the corpus: documents stream from the sources through three passes (scan: fingerprint and
held-out split; optional tokenizer training on a bounded sample; encode with N workers, written in input order).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from tidar_jax.checkpoint.atomic import publish_dir, remove_write_leftovers, write_json
from tidar_jax.data import shards as sh
from tidar_jax.data import sources as src
from tidar_jax.data import tokenizer as tk
from tidar_jax.data.sources import DataError

log = logging.getLogger("tidar_jax.data")

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
JOURNAL = "journal.json"
LOCK = "lock"
SPLITS = ("train", "eval")
SPLIT_FILES = {"train": "train.bin", "eval": "eval.bin"}  # format 1 (still read)
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB uint16 shards
DEFAULT_TOKENIZER_SAMPLE_BYTES = 1 << 30  # the BPE is trained on at most this much train text
CHUNK_DOCUMENTS = 256  # documents per encode task
CHUNK_BYTES = 1 << 20  # ... or this much text, whichever comes first
JOURNAL_EVERY_S = 1.0
SMALL_CORPUS_BYTES = 16 << 20  # by default, one worker per this much text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2 ** 16 else np.dtype(np.uint32)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir) -> dict:
    """The manifest of a prepared data dir; DataError with the path if it is missing or unreadable."""
    path = os.path.join(os.fspath(data_dir), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise DataError(f"data dir {os.fspath(data_dir)!r} is a file, not a directory") from None
        raise DataError(f"data dir {os.fspath(data_dir)!r} has no {MANIFEST}; run "
                        "`python -m tidar_jax.data.prepare --out DIR` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path!r}: cannot be read as a manifest ({e})") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise DataError(f"{path!r}: format_version={manifest.get('format_version')!r}, this code reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; prepare the corpus again")
    return manifest


def _complete(out_dir: str, manifest: dict) -> bool:
    """Every token and index file exists with exactly the byte size the manifest promises."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"]:
        for part in sh.split_parts(out_dir, manifest, split):
            if not os.path.isfile(part["path"]) or os.path.getsize(part["path"]) != part["tokens"] * itemsize:
                return False
            if part["docs_path"] is not None and (
                    not os.path.isfile(part["docs_path"])
                    or os.path.getsize(part["docs_path"]) != part["documents"] * 2 * sh.DOC_INDEX_DTYPE.itemsize):
                return False
    return os.path.isfile(os.path.join(out_dir, tk.TOKENIZER_FILE))


def _write_manifest(path: str, manifest: dict) -> None:
    write_json(path, manifest)


def _report_skipped(skipped: list[dict]) -> None:
    if skipped:
        first = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning("skipped %d input(s) (listed in the manifest under 'skipped'): %s%s", len(skipped), first, more)


# ----------------------------------------------------------------------------------------------------------------
# Pass 1: scan (fingerprint of every document, held-out assignment, counts)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Scan:
    corpus_fingerprint: str
    documents: int
    bytes: int
    files_read: int
    with_documents: int
    skipped: list
    truncated: dict
    forced: dict  # key -> split, where the "both splits non-empty" rule overrides the hash


def _scan(entries, ignored, truncated, text_field, max_bytes, heldout_fraction, seed, force_both: bool) -> Scan:
    h = hashlib.sha256()
    documents = total_bytes = n_eval = with_documents = 0
    skipped = []
    lowest = highest = None  # (score, key): the first document with the lowest / highest score
    last_path = None
    stats: dict = {}
    for item in src.iter_stream(entries, text_field, max_bytes, stats):
        if isinstance(item, src.Skip):
            skipped.append(item.as_dict())
            continue
        data = item.text.encode("utf-8")
        h.update(item.key.encode() + b"\0" + hashlib.sha256(data).digest() + b"\n")
        documents += 1
        total_bytes += len(data)
        with_documents += item.path != last_path
        last_path = item.path
        score = src.heldout_score(seed, item.key)
        n_eval += score < heldout_fraction
        if lowest is None or score < lowest[0]:
            lowest = (score, item.key)
        if highest is None or score > highest[0]:
            highest = (score, item.key)
    if stats.get("files_not_read_by_max_bytes"):
        truncated = {"files_not_read": truncated["files_not_read"] + stats["files_not_read_by_max_bytes"],
                     "by": "max_bytes"}
    h.update(json.dumps([skipped, ignored, truncated], sort_keys=True).encode())
    forced = {}
    # So that a small corpus still has both splits: a positive fraction with >= 2 documents holds out at least the
    # lowest-scored document and keeps at least the highest-scored one for training.
    if force_both and heldout_fraction > 0 and documents >= 2:
        if n_eval == 0:
            forced[lowest[1]] = "eval"
        elif n_eval == documents:
            forced[highest[1]] = "train"
    return Scan(h.hexdigest(), documents, total_bytes, stats.get("files_read", 0), with_documents, skipped,
                truncated, forced)


def _split_of(key: str, scan: Scan, heldout_fraction: float, seed: int) -> str:
    if key in scan.forced:
        return scan.forced[key]
    return "eval" if src.heldout_score(seed, key) < heldout_fraction else "train"


# ----------------------------------------------------------------------------------------------------------------
# Pass 2 and 3: tokenizer, then encode + write
# ----------------------------------------------------------------------------------------------------------------

def _train_sample(entries, text_field, max_bytes, scan, heldout_fraction, seed, sample_bytes):
    used = 0
    for item in src.iter_stream(entries, text_field, max_bytes):
        if isinstance(item, src.Document) and _split_of(item.key, scan, heldout_fraction, seed) == "train":
            yield item.text
            used += len(item.text)
            if used >= sample_bytes:
                return


def _make_tokenizer(work: str, tokenizer, vocab_size, entries, text_field, max_bytes, scan, heldout_fraction, seed,
                    sample_bytes) -> dict:
    tok_path = os.path.join(work, tk.TOKENIZER_FILE)
    if tokenizer is None:
        log.info("training a byte-level BPE (vocab %d) on up to %d MB of the train split", vocab_size,
                 sample_bytes >> 20)
        tok = tk.train_bpe(_train_sample(entries, text_field, max_bytes, scan, heldout_fraction, seed, sample_bytes),
                           vocab_size)
        info = {"kind": "trained-bytelevel-bpe", "source": None}
    else:
        tok = tk.load_tokenizer(tokenizer)
        info = {"kind": "file", "source": os.path.abspath(tk.tokenizer_file(tokenizer))}
    info.update(tk.ensure_special_tokens(tok))
    tok.save(tok_path)
    info.update(file=tk.TOKENIZER_FILE, sha256=_sha256_file(tok_path))
    return info


def _chunks(stream, start_item: int, scan, heldout_fraction, seed):
    """``(texts, meta, end_item)`` chunks of the stream after item ``start_item`` (meta: split, key, path, bytes)."""
    texts, meta, size = [], [], 0
    for i, item in enumerate(stream):
        if i < start_item or isinstance(item, src.Skip):
            continue
        texts.append(item.text)
        nbytes = len(item.text.encode("utf-8"))
        meta.append((_split_of(item.key, scan, heldout_fraction, seed), item.key, item.path, nbytes))
        size += nbytes
        if len(texts) >= CHUNK_DOCUMENTS or size >= CHUNK_BYTES:
            yield texts, meta, i + 1
            texts, meta, size = [], [], 0
    if texts:
        yield texts, meta, None  # None: the end of the stream


class _Progress:
    """A tqdm bar on a TTY, else one log line every 10 s."""

    def __init__(self, total_docs: int, done_docs: int, enabled: bool):
        self.total, self.done, self.tokens, self.bytes = total_docs, done_docs, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_docs, initial=done_docs, unit="doc", desc="encode", dynamic_ncols=True)

    def update(self, docs: int, nbytes: int, tokens: int) -> None:
        self.done += docs
        self.bytes += nbytes
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix({"MB": f"{self.bytes / 1e6:,.0f}", "tok/s": f"{rate:,.0f}"}, refresh=False)
        elif now - self.last >= 10:
            self.last = now
            log.info("encoded %d/%d documents, %.0f MB, %.0f tokens/s", self.done, self.total, self.bytes / 1e6,
                     rate)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _encode_all(work, entries, text_field, max_bytes, scan, heldout_fraction, seed, tok_info, workers,
                shard_tokens, journal_base, resume_state, progress_enabled) -> dict:
    dtype = token_dtype(tok_info["vocab_size"])
    writers = {s: sh.SplitWriter(work, s, dtype, tok_info["eos_token_id"], shard_tokens) for s in SPLITS}
    counts = {s: {"bytes": 0, "files": 0, "last_path": None} for s in SPLITS}
    docs_path = os.path.join(work, DOCUMENTS)
    start_item = 0
    if resume_state is not None:
        for s in SPLITS:
            writers[s].restore(resume_state["writers"][s])
        counts = resume_state["counts"]
        start_item = resume_state["items_done"]
        docs_f = open(docs_path, "r+b")
        docs_f.truncate(resume_state["documents_bytes"])
        docs_f.seek(0, os.SEEK_END)
    else:
        for name in os.listdir(work):  # anything an earlier run wrote before its first journal entry
            if name not in (JOURNAL, LOCK, tk.TOKENIZER_FILE):
                os.remove(os.path.join(work, name))
        docs_f = open(docs_path, "wb")
    done_docs = sum(writers[s].documents for s in SPLITS)
    progress = _Progress(scan.documents, done_docs, progress_enabled)
    last_journal = time.perf_counter()
    from tidar_jax.data.encode import OrderedEncoder

    try:
        with OrderedEncoder(os.path.join(work, tk.TOKENIZER_FILE), dtype.name, workers) as encoder:
            stream = src.iter_stream(entries, text_field, max_bytes)
            for (texts, meta, end_item), (ids, lengths) in encoder.map(
                    _chunks(stream, start_item, scan, heldout_fraction, seed)):
                rows, pos = [], 0
                for (split, key, path, nbytes), n in zip(meta, lengths.tolist()):
                    offset = writers[split].add(ids[pos:pos + n])
                    pos += n
                    c = counts[split]
                    c["bytes"] += nbytes
                    c["files"] += path != c["last_path"]  # a file's documents are consecutive in the stream
                    c["last_path"] = path
                    rows.append(json.dumps({"key": key, "path": path, "split": split, "offset": offset,
                                            "tokens": n}) + "\n")
                docs_f.write("".join(rows).encode())
                progress.update(len(texts), sum(m[3] for m in meta), int(lengths.sum()))
                now = time.perf_counter()
                if end_item is not None and now - last_journal >= JOURNAL_EVERY_S:
                    last_journal = now
                    docs_f.flush()
                    for w in writers.values():
                        w.flush()
                    # The journal is written after the data it describes is flushed, so a kill at any point
                    # leaves files at least as long as the journal says (resume cuts them back).
                    write_json(os.path.join(work, JOURNAL), {
                        **journal_base, "items_done": end_item, "documents_bytes": docs_f.tell(),
                        "writers": {s: w.state() for s, w in writers.items()}, "counts": counts})
    finally:
        progress.close()
        docs_f.close()
        for w in writers.values():
            w.close()
    splits = {}
    for s in SPLITS:
        info = writers[s].info()
        splits[s] = {"shards": info["shards"], "documents": info["documents"], "files": counts[s]["files"],
                     "bytes": counts[s]["bytes"], "tokens": info["tokens"]}
    return splits


# ----------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------

def _positive_int(name, value, low=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DataError(f"{name}={value!r}: must be an integer >= {low}")


def parse_shard(shard) -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` -> ``(i, n)`` with ``0 <= i < n``."""
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise DataError(f"shard={shard!r}: must be i/n with integers 0 <= i < n (e.g. 0/4)") from None
    else:
        i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise DataError(f"shard={shard!r}: must be i/n with integers 0 <= i < n (e.g. 0/4)")
    return i, n


def prepare_corpus(out_dir, sources=None, tokenizer=None, vocab_size: int = 4096, heldout_fraction: float = 0.05,
                   seed: int = 0, max_files: int | None = None, max_bytes: int | None = None,
                   overwrite: bool = False, text_field: str = "text", workers: int | None = None,
                   shard="0/1", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES, progress: bool = True) -> dict:
    """Tokenize ``sources`` (default: the CPython stdlib) into ``out_dir``; returns the manifest.

    Idempotent: when ``out_dir`` already holds a complete corpus with the same fingerprint (settings + tokenizer +
    content of every document) it is returned untouched. A different existing corpus is an error unless
    ``overwrite=True``. The directory appears atomically. An interrupted run (killed) leaves ``.<name>.partial``;
    running again resumes it when the inputs and settings are the same, else restarts (it logs which).
    ``workers`` (default: the available cores) does not change the output. ``shard="i/n"`` prepares the i-th of n
    contiguous ranges of input files (needs a given tokenizer); ``tidar_jax.data.merge`` joins the parts.
    """
    from tidar_jax.data.encode import default_workers

    out_dir = os.path.abspath(os.fspath(out_dir))
    if not isinstance(heldout_fraction, (int, float)) or isinstance(heldout_fraction, bool) \
            or not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction={heldout_fraction!r}: must be a number in [0, 1)")
    _positive_int("seed", seed, 0)
    auto_workers = workers is None
    workers = default_workers() if workers is None else workers
    _positive_int("workers", workers)
    _positive_int("shard_tokens", shard_tokens)
    _positive_int("tokenizer_sample_bytes", tokenizer_sample_bytes)
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field={text_field!r}: must be a non-empty field / column name")
    shard_index, shard_count = parse_shard(shard)
    if _existing(out_dir) is None:  # a new corpus: its location is checked before the sources are read
        from tidar_jax.output_paths import OutputPathError, check_output_dir

        try:
            check_output_dir(out_dir, existing=lambda path: None)  # an existing dir is judged below
        except OutputPathError as e:
            raise DataError(f"out_dir {e}") from None
    if tokenizer is None:
        if shard_count > 1:
            raise DataError(f"shard={shard_index}/{shard_count} needs a given tokenizer (--tokenizer) so that every "
                            "part uses the same ids; prepare one part (or a sample) without --shard first and "
                            "pass its tokenizer.json")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
                or not tk.MIN_VOCAB <= vocab_size < 2 ** 32:
            raise DataError(f"vocab_size={vocab_size!r}: must be an integer in [{tk.MIN_VOCAB}, 2**32)")
        tok_setting = {"kind": "trained-bytelevel-bpe", "vocab_size": vocab_size,
                       "sample_bytes": tokenizer_sample_bytes}
    else:
        tok_file = tk.tokenizer_file(tokenizer)
        tok_setting = {"kind": "file", "path": os.path.abspath(tok_file), "sha256": _sha256_file(tok_file)}

    src.check_limits(max_files, max_bytes)
    entries, ignored, described = src.resolve_sources(sources)
    entries, truncated = src.select_entries(entries, max_files, (shard_index, shard_count))
    scan = _scan(entries, ignored, truncated, text_field, max_bytes, heldout_fraction, seed,
                 force_both=shard_count == 1)
    _report_skipped(scan.skipped)
    if not scan.documents:
        raise DataError(f"no usable text in sources {sources!r}: {len(scan.skipped)} input(s) skipped, "
                        f"{sum(ignored.values())} ignored by extension")
    if auto_workers:  # worker start-up (a few seconds) is not worth it for a small corpus
        workers = max(1, min(workers, scan.bytes // SMALL_CORPUS_BYTES))
    settings = {"sources": described, "tokenizer": tok_setting, "heldout_fraction": float(heldout_fraction),
                "seed": seed, "max_files": max_files, "max_bytes": max_bytes, "text_field": text_field,
                "shard": [shard_index, shard_count], "shard_tokens": shard_tokens}
    fingerprint = hashlib.sha256((json.dumps(settings, sort_keys=True) + scan.corpus_fingerprint
                                  + str(FORMAT_VERSION)).encode()).hexdigest()

    existing = _existing(out_dir)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint and _complete(out_dir, existing):
            log.info("%s already holds this corpus (fingerprint %s); nothing to do", out_dir, fingerprint[:12])
            return existing
        if not overwrite:
            raise DataError(f"out_dir {out_dir!r} already holds a different prepared corpus (fingerprint "
                            f"{str(existing.get('fingerprint'))[:12]}, wanted {fingerprint[:12]}); choose another "
                            "directory or pass overwrite=True (--overwrite)")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"out_dir {out_dir!r} exists, is not empty and holds no {MANIFEST}; choose an empty or new "
                        "directory")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(out_dir)}.partial")
    lock = _lock(work)
    try:
        # Another process may have published this corpus while we waited for the lock.
        raced = _existing(out_dir)
        if raced and raced.get("fingerprint") == fingerprint and _complete(out_dir, raced):
            shutil.rmtree(work, ignore_errors=True)
            return raced
        resume_state = _resume_state(work, fingerprint)
        journal_base = {"fingerprint": fingerprint}
        try:
            if resume_state is None:
                tok_info = _make_tokenizer(work, tokenizer, vocab_size, entries, text_field, max_bytes, scan,
                                           heldout_fraction, seed, tokenizer_sample_bytes)
                write_json(os.path.join(work, JOURNAL), {**journal_base, "tokenizer": tok_info,
                                                                "items_done": 0, "documents_bytes": 0,
                                                                "writers": None})
            else:
                tok_info = resume_state["tokenizer"]
            journal_base["tokenizer"] = tok_info
            manifest = _build(work, entries, text_field, max_bytes, scan, heldout_fraction, seed, tok_info, workers,
                              shard_tokens, journal_base, resume_state, progress, settings, described, ignored,
                              fingerprint, (shard_index, shard_count))
            for name in (JOURNAL, LOCK):
                os.remove(os.path.join(work, name))
            published = publish_dir(work, out_dir, replace=existing is not None)
        except (KeyboardInterrupt, SystemExit):
            log.warning("interrupted: %s is kept; run the same command again to resume", work)
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        os.close(lock)
    if not published:
        # Another process (e.g. a second training host) published first; its copy is fine if it is this corpus.
        shutil.rmtree(work, ignore_errors=True)
        raced = _existing(out_dir)
        if raced and raced.get("fingerprint") == fingerprint and _complete(out_dir, raced):
            return raced
        raise DataError(f"out_dir {out_dir!r} was filled by another process with a different corpus while preparing")
    log.info("prepared %s: %d train / %d eval tokens", out_dir, manifest["splits"]["train"]["tokens"],
             manifest["splits"]["eval"]["tokens"])
    return manifest


def _build(work, entries, text_field, max_bytes, scan, heldout_fraction, seed, tok_info, workers, shard_tokens,
           journal_base, resume_state, progress, settings, described, ignored, fingerprint, shard) -> dict:
    splits = _encode_all(work, entries, text_field, max_bytes, scan, heldout_fraction, seed, tok_info, workers,
                         shard_tokens, journal_base, resume_state if resume_state and resume_state["writers"] else None,
                         progress)
    dtype = token_dtype(tok_info["vocab_size"])
    manifest = {
        "format": "tidar-corpus", "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint, "corpus_fingerprint": scan.corpus_fingerprint,
        "settings": settings,
        "sources": described,
        "shard": {"index": shard[0], "count": shard[1]},
        "tokenizer": tok_info,
        "vocab_size": tok_info["vocab_size"], "eos_token_id": tok_info["eos_token_id"],
        "mask_token_id": tok_info["mask_token_id"], "dtype": dtype.name,
        "splits": splits,
        "files": {"read": scan.files_read, "with_documents": scan.with_documents,
                  "skipped_inputs": len(scan.skipped)},
        "skipped": scan.skipped,
        "ignored_extensions": ignored,
        "truncated": scan.truncated,
        "documents_file": DOCUMENTS,
        "python": sys.version.split()[0],
    }
    _write_manifest(os.path.join(work, MANIFEST), manifest)
    return manifest


def _lock(work: str) -> int:
    """An exclusive lock on ``work/lock`` (created with ``work``); waits while another process holds it."""
    while True:
        os.makedirs(work, exist_ok=True)
        path = os.path.join(work, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing in %s; waiting for it", work)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd  # still the live lock file (the holder did not publish and remove it meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)


def _resume_state(work: str, fingerprint: str) -> dict | None:
    """The journal of an interrupted run of the same preparation, or None (after clearing ``work``)."""
    path = os.path.join(work, JOURNAL)
    state = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError):
            state = None
    names = [n for n in os.listdir(work) if n != LOCK]
    if state is not None and state.get("fingerprint") == fingerprint \
            and os.path.isfile(os.path.join(work, tk.TOKENIZER_FILE)) \
            and _sha256_file(os.path.join(work, tk.TOKENIZER_FILE)) == state["tokenizer"]["sha256"]:
        log.warning("resuming the interrupted preparation in %s after %d input items", work, state["items_done"])
        remove_write_leftovers(work)  # a kill inside a journal write leaves its temp file
        return state
    if names:
        why = "it was for other inputs or settings" if state is not None else "it has no usable journal"
        log.warning("restarting: removing the interrupted preparation in %s (%s)", work, why)
        for name in names:
            p = os.path.join(work, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return None


def corpus_dir_problem(out_dir: str) -> str | None:
    """Why an existing directory cannot be prepared into (None when it can: empty, or a readable corpus)."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        try:
            load_manifest(out_dir)
        except (DataError, OSError, ValueError):
            return f"{MANIFEST} cannot be read (a damaged corpus dir); pass --overwrite to replace it"
    return None


def _existing(out_dir: str) -> dict | None:
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        return None
    try:
        return load_manifest(out_dir)
    except DataError:
        return {}  # unreadable or old format: treated as a different corpus


