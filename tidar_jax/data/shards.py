"""Sharded token files: the writer used by preparation and the reader every pipeline uses.

A split is a sequence of shards ``{split}-{k:05d}.bin`` (flat token ids; every document is followed by one eos
token) with a document index ``{split}-{k:05d}.docs`` next to each (int64 pairs: offset of the document's first token
in its shard, token count without the eos). A shard only rolls over at a document boundary, once it holds at least
``shard_tokens`` tokens, so it never splits a document. Reading concatenates the shards of a split into one stream.

Format-1 corpora (one ``train.bin``/``eval.bin`` per split, eos *between* documents, ``documents.jsonl`` for the
boundaries) are read through the same interface.
"""

from __future__ import annotations

import bisect
import json
import os

import numpy as np

DOC_INDEX_DTYPE = np.dtype(np.int64)


def shard_file(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


def docs_file(split: str, k: int) -> str:
    return f"{split}-{k:05d}.docs"


class SplitWriter:
    """Appends encoded documents (plus eos) to the shards of one split; ``state()`` / ``restore`` for resuming."""

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, eos_id: int, shard_tokens: int):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype)
        self.eos = np.array([eos_id], dtype=self.dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # closed and current shards: {file, docs_file, tokens, documents}
        self.tokens = self.documents = 0  # whole split (tokens include the eos after every document)
        self._bin = self._idx = None

    def _open_new(self) -> None:
        k = len(self.shards)
        self.shards.append({"file": shard_file(self.split, k), "docs_file": docs_file(self.split, k),
                            "tokens": 0, "documents": 0})
        self._bin = open(os.path.join(self.out_dir, self.shards[-1]["file"]), "wb")
        self._idx = open(os.path.join(self.out_dir, self.shards[-1]["docs_file"]), "wb")

    def add(self, ids: np.ndarray) -> int:
        """Write one document; returns its offset in the split stream."""
        if self._bin is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self._close_current()
            self._open_new()
        shard = self.shards[-1]
        offset = self.tokens
        self._bin.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._bin.write(self.eos.tobytes())
        self._idx.write(np.array([shard["tokens"], len(ids)], dtype=DOC_INDEX_DTYPE).tobytes())
        shard["tokens"] += len(ids) + 1
        shard["documents"] += 1
        self.tokens += len(ids) + 1
        self.documents += 1
        return offset

    def flush(self) -> None:
        for f in (self._bin, self._idx):
            if f is not None:
                f.flush()

    def _close_current(self) -> None:
        for f in (self._bin, self._idx):
            if f is not None:
                f.close()
        self._bin = self._idx = None

    def close(self) -> None:
        self._close_current()

    def state(self) -> dict:
        return {"shards": [dict(s) for s in self.shards], "tokens": self.tokens, "documents": self.documents}

    def restore(self, state: dict) -> None:
        """Continue after a journaled state: files are cut back to the journaled sizes, later shards deleted."""
        self.shards = [dict(s) for s in state["shards"]]
        self.tokens, self.documents = state["tokens"], state["documents"]
        k = len(self.shards)
        while os.path.exists(os.path.join(self.out_dir, shard_file(self.split, k))):
            for name in (shard_file(self.split, k), docs_file(self.split, k)):
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.remove(os.path.join(self.out_dir, name))
            k += 1
        if self.shards:
            shard = self.shards[-1]
            self._bin = open(os.path.join(self.out_dir, shard["file"]), "r+b")
            self._bin.truncate(shard["tokens"] * self.dtype.itemsize)
            self._bin.seek(0, os.SEEK_END)
            self._idx = open(os.path.join(self.out_dir, shard["docs_file"]), "r+b")
            self._idx.truncate(shard["documents"] * 2 * DOC_INDEX_DTYPE.itemsize)
            self._idx.seek(0, os.SEEK_END)

    def info(self) -> dict:
        return {"shards": [dict(s) for s in self.shards], "tokens": self.tokens, "documents": self.documents}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def split_parts(data_dir: str, manifest: dict, split: str) -> list[dict]:
    """``[{"path", "tokens", "docs_path"}]`` of a split (one part for a format-1 corpus)."""
    info = manifest["splits"][split]
    if "shards" not in info:  # format 1
        return [{"path": os.path.join(data_dir, info["file"]), "tokens": info["tokens"], "docs_path": None}]
    return [{"path": os.path.join(data_dir, s["file"]), "tokens": s["tokens"],
             "docs_path": os.path.join(data_dir, s["docs_file"]), "documents": s["documents"]}
            for s in info["shards"]]


class TokenStream:
    """The concatenated shards of a split as one random-access token stream (memmaps opened lazily, not pickled)."""

    def __init__(self, parts: list[dict], dtype: str):
        self.parts = [dict(p) for p in parts]
        self.dtype = np.dtype(dtype)
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + p["tokens"])
        self.num_tokens = self.starts[-1]
        self._maps = None

    def _memmaps(self):
        if self._maps is None:
            self._maps = [np.memmap(p["path"], dtype=self.dtype, mode="r", shape=(p["tokens"],)) if p["tokens"]
                          else np.empty(0, self.dtype) for p in self.parts]
        return self._maps

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int32."""
        maps = self._memmaps()
        out = np.empty(stop - start, dtype=np.int32)
        k = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < stop:
            lo = pos - self.starts[k]
            take = min(stop - pos, self.parts[k]["tokens"] - lo)
            out[pos - start:pos - start + take] = maps[k][lo:lo + take]
            pos += take
            k += 1
        return out

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}


def document_spans(data_dir: str, manifest: dict, split: str) -> np.ndarray:
    """int64 ``[D, 2]``: (offset in the split stream, token count without eos) of every document, in order."""
    parts = split_parts(data_dir, manifest, split)
    if not parts:  # a split without documents
        return np.zeros((0, 2), np.int64)
    if parts[0]["docs_path"] is None:  # format 1: boundaries are in documents.jsonl
        rows = []
        with open(os.path.join(data_dir, manifest.get("documents_file", "documents.jsonl"))) as f:
            for line in f:
                row = json.loads(line)
                if row["split"] == split:
                    rows.append((row["offset"], row["tokens"]))
        return np.array(rows, dtype=np.int64).reshape(-1, 2)
    spans, base = [], 0
    for p in parts:
        idx = np.fromfile(p["docs_path"], dtype=DOC_INDEX_DTYPE).reshape(-1, 2)
        spans.append(idx + np.array([base, 0], dtype=np.int64))
        base += p["tokens"]
    return np.concatenate(spans, axis=0) if spans else np.zeros((0, 2), np.int64)
