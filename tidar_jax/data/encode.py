"""Tokenize chunks of documents in N worker processes, results in input order, with a bounded number in flight.

Workers are started with ``spawn`` (safe with threads in the parent, e.g. JAX or grain) and each loads the tokenizer
from its saved ``tokenizer.json``, so every worker count encodes with byte-identical tokenizers and the output does not
depend on the count. ``Pool.imap`` is not used: its feeder thread drains the whole input iterator into the task
queue, which would hold the corpus in memory; here at most ``max_in_flight`` chunks exist at once.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

import numpy as np

_WORKER_TOKENIZER = None


def _load(tokenizer_path: str):
    from tidar_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load(tokenizer_path)


def encode_chunk(tok, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: the documents' token ids concatenated (no separators), and each one's length."""
    from tidar_jax.data.tokenizer import encode_documents

    encoded = encode_documents(tok, texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    dtype = np.dtype(dtype)
    flat = (np.concatenate([np.asarray(ids, dtype=dtype) for ids in encoded]) if encoded
            else np.empty(0, dtype))
    return flat, lengths


def _worker_encode(texts: list[str], dtype: str):
    return encode_chunk(_WORKER_TOKENIZER, texts, dtype)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OrderedEncoder:
    """``encoder.map(chunks)`` yields ``(chunk, (ids, lengths))`` in input order; ``chunk[0]`` is the text list.

    ``workers == 1`` encodes in this process (no start-up cost); more use a spawn-started process pool.
    """

    def __init__(self, tokenizer_path: str, dtype: str, workers: int, max_in_flight: int | None = None):
        self.dtype, self.workers = dtype, workers
        self.max_in_flight = max_in_flight or 2 * workers
        self._pool = None
        self._tok = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(tokenizer_path,))
        else:
            self._tok = _load(tokenizer_path)

    def map(self, chunks: Iterable) -> Iterator:
        if self._pool is None:
            for chunk in chunks:
                yield chunk, encode_chunk(self._tok, chunk[0], self.dtype)
            return
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, self._pool.submit(_worker_encode, chunk[0], self.dtype)))
            if len(pending) >= self.max_in_flight:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
