"""Corpus preparation: tokenize once into flat memory-mappable token files plus a manifest.

Layout of a prepared ``out_dir`` (written in a temp dir, then renamed into place):
  manifest.json     settings, fingerprints, tokenizer info, counts per split, skipped inputs with reasons
  tokenizer.json    the tokenizer every id in the .bin files refers to
  train.bin         flat token ids (uint16 if vocab < 65536 else uint32), documents joined by the eos token
  eval.bin          same for the held-out documents (whole files / JSONL records)
  documents.jsonl   one line per document: key, source path, split, token offset in its split file, token count
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid

import numpy as np

from tidar_jax.data import sources as src
from tidar_jax.data import tokenizer as tk
from tidar_jax.data.sources import DataError

log = logging.getLogger("tidar_jax.data")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
SPLIT_FILES = {"train": "train.bin", "eval": "eval.bin"}
_ENCODE_CHUNK = 256  # documents per encode_batch call: bounds the size of Python id lists held at once


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2 ** 16 else np.dtype(np.uint32)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _corpus_fingerprint(corpus: src.Corpus) -> str:
    h = hashlib.sha256()
    for doc in corpus.documents:
        h.update(doc.key.encode() + b"\0" + hashlib.sha256(doc.text.encode("utf-8")).digest() + b"\n")
    h.update(json.dumps([corpus.skipped, corpus.ignored_extensions, corpus.truncated], sort_keys=True).encode())
    return h.hexdigest()


def load_manifest(data_dir) -> dict:
    """The manifest of a prepared data dir; DataError with the path if it is missing or unreadable."""
    path = os.path.join(os.fspath(data_dir), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"data dir {os.fspath(data_dir)!r} has no {MANIFEST}; run "
                        "`python -m tidar_jax.data.prepare --out DIR` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path!r}: cannot be read as a manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path!r}: format_version={manifest.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; prepare the corpus again")
    return manifest


def _complete(out_dir: str, manifest: dict) -> bool:
    """The split files exist with exactly the byte sizes the manifest promises."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for name, info in manifest["splits"].items():
        path = os.path.join(out_dir, info["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != info["tokens"] * itemsize:
            return False
    return os.path.isfile(os.path.join(out_dir, tk.TOKENIZER_FILE))


def _write_split(path: str, tok, docs: list, eos_id: int, dtype: np.dtype, split: str, index: list) -> int:
    """Encode docs into ``path`` with eos between documents; append per-document rows to ``index``."""
    written = 0
    eos = np.array([eos_id], dtype=dtype)
    with open(path, "wb") as f:
        for start in range(0, len(docs), _ENCODE_CHUNK):
            chunk = docs[start:start + _ENCODE_CHUNK]
            for doc, ids in zip(chunk, tk.encode_documents(tok, [d.text for d in chunk])):
                if written:
                    f.write(eos.tobytes())
                    written += 1
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                index.append({"key": doc.key, "path": doc.path, "split": split, "offset": written,
                              "tokens": len(ids)})
                written += len(ids)
    return written


def _build(tmp: str, corpus: src.Corpus, train_docs, eval_docs, tokenizer, vocab_size, settings, fingerprints):
    if tokenizer is None:
        log.info("training a byte-level BPE (vocab %d) on %d train documents", vocab_size, len(train_docs))
        tok = tk.train_bpe((d.text for d in train_docs), vocab_size, length=len(train_docs))
        tok_info = {"kind": "trained-bytelevel-bpe", "source": None}
    else:
        tok = tk.load_tokenizer(tokenizer)
        tok_info = {"kind": "file", "source": os.path.abspath(tk.tokenizer_file(tokenizer))}
    tok_info.update(tk.ensure_special_tokens(tok))
    tok_path = os.path.join(tmp, tk.TOKENIZER_FILE)
    tok.save(tok_path)
    tok_info.update(file=tk.TOKENIZER_FILE, sha256=_sha256_file(tok_path))
    dtype = token_dtype(tok_info["vocab_size"])

    index: list[dict] = []
    splits = {}
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        tokens = _write_split(os.path.join(tmp, SPLIT_FILES[split]), tok, docs, tok_info["eos_token_id"], dtype,
                              split, index)
        splits[split] = {"file": SPLIT_FILES[split], "documents": len(docs),
                         "files": len({d.path for d in docs}),
                         "bytes": sum(len(d.text.encode("utf-8")) for d in docs), "tokens": tokens}
    with open(os.path.join(tmp, DOCUMENTS), "w") as f:
        for row in index:
            f.write(json.dumps(row) + "\n")

    manifest = {
        "format": "tidar-corpus", "format_version": FORMAT_VERSION, **fingerprints,
        "settings": settings,
        "sources": corpus.sources,
        "tokenizer": tok_info,
        "vocab_size": tok_info["vocab_size"], "eos_token_id": tok_info["eos_token_id"],
        "mask_token_id": tok_info["mask_token_id"], "dtype": dtype.name,
        "splits": splits,
        "files": {"read": corpus.files_read, "with_documents": len({d.path for d in corpus.documents}),
                  "skipped_inputs": len(corpus.skipped)},
        "skipped": corpus.skipped,
        "ignored_extensions": corpus.ignored_extensions,
        "truncated": corpus.truncated,
        "documents_file": DOCUMENTS,
        "python": sys.version.split()[0],
        "created_unix": int(time.time()),
    }
    _write_manifest(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def _write_manifest(path: str, manifest: dict) -> None:
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def _report_skipped(skipped: list[dict]) -> None:
    if skipped:
        first = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning("skipped %d input(s) (listed in the manifest under 'skipped'): %s%s", len(skipped), first, more)


def prepare_corpus(out_dir, sources=None, tokenizer=None, vocab_size: int = 4096, heldout_fraction: float = 0.05,
                   seed: int = 0, max_files: int | None = None, max_bytes: int | None = None,
                   overwrite: bool = False) -> dict:
    """Tokenize ``sources`` (default: the CPython stdlib) into ``out_dir``; returns the manifest.

    Idempotent: when ``out_dir`` already holds a complete corpus with the same fingerprint (settings + tokenizer +
    content of every input) it is returned untouched. A different existing corpus is an error unless
    ``overwrite=True``. The directory appears atomically (built in a sibling temp dir, then renamed).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not isinstance(heldout_fraction, (int, float)) or isinstance(heldout_fraction, bool) \
            or not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction={heldout_fraction!r}: must be a number in [0, 1)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed={seed!r}: must be an integer >= 0")
    if tokenizer is None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) \
                or not tk.MIN_VOCAB <= vocab_size < 2 ** 32:
            raise DataError(f"vocab_size={vocab_size!r}: must be an integer in [{tk.MIN_VOCAB}, 2**32)")
        tok_setting = {"kind": "trained-bytelevel-bpe", "vocab_size": vocab_size}
    else:
        tok_file = tk.tokenizer_file(tokenizer)
        tok_setting = {"kind": "file", "path": os.path.abspath(tok_file), "sha256": _sha256_file(tok_file)}

    corpus = src.read_corpus(sources, max_files=max_files, max_bytes=max_bytes)
    _report_skipped(corpus.skipped)
    if not corpus.documents:
        raise DataError(f"no usable text in sources {sources!r}: {len(corpus.skipped)} input(s) skipped, "
                        f"{sum(corpus.ignored_extensions.values())} ignored by extension")
    settings = {"sources": corpus.sources, "tokenizer": tok_setting, "heldout_fraction": float(heldout_fraction),
                "seed": seed, "max_files": max_files, "max_bytes": max_bytes}
    corpus_fp = _corpus_fingerprint(corpus)
    fingerprint = hashlib.sha256(
        (json.dumps(settings, sort_keys=True) + corpus_fp + str(FORMAT_VERSION)).encode()).hexdigest()
    fingerprints = {"fingerprint": fingerprint, "corpus_fingerprint": corpus_fp}

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

    train_docs, eval_docs = src.split_documents(corpus.documents, heldout_fraction, seed)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        manifest = _build(tmp, corpus, train_docs, eval_docs, tokenizer, vocab_size, settings, fingerprints)
        published = _publish(tmp, out_dir, replace=existing is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not published:
        # Another process (e.g. a second training host) published first; its copy is fine if it is this corpus.
        shutil.rmtree(tmp, ignore_errors=True)
        raced = _existing(out_dir)
        if raced and raced.get("fingerprint") == fingerprint and _complete(out_dir, raced):
            return raced
        raise DataError(f"out_dir {out_dir!r} was filled by another process with a different corpus while preparing")
    log.info("prepared %s: %d train / %d eval tokens", out_dir, manifest["splits"]["train"]["tokens"],
             manifest["splits"]["eval"]["tokens"])
    return manifest


def _existing(out_dir: str) -> dict | None:
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        return None
    try:
        return load_manifest(out_dir)
    except DataError:
        return {}  # unreadable or old format: treated as a different corpus


def _publish(tmp: str, out_dir: str, replace: bool) -> bool:
    """Rename tmp onto out_dir; False if out_dir became non-empty meanwhile.

    rename(2) atomically replaces a missing or empty directory; an old corpus (overwrite) is moved aside first.
    """
    if replace:
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
