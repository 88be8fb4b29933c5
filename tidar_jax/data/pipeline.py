"""The grain input pipeline over a prepared corpus: fixed-length windows, seeded shuffle, process sharding, batching.

Order contract (what makes multi-process runs reproduce single-process runs):
  * window i of a split is ``tokens[i*S:(i+1)*S]`` (non-overlapping; the tail shorter than S is unused);
  * the window *stream* is epoch 0's permutation, then epoch 1's, ... (grain shuffles each epoch with its own seed,
    derived from ``seed``), so each epoch visits every window exactly once;
  * global step t consumes stream items ``[t*G, (t+1)*G)`` (G = global_batch), batches may straddle epochs;
  * process p of P gets rows ``[p*G/P, (p+1)*G/P)`` of that global batch, so the global batch is the concatenation
    of the process-local batches in process order, whatever P is.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import grain
import numpy as np

from tidar_jax.data.corpus import SPLIT_FILES, load_manifest
from tidar_jax.data.sources import DataError

STATE_VERSION = 1


class TokenWindows:
    """Random-access source of non-overlapping ``seq_len`` windows of a flat token file (int32 copies).

    The memmap is opened lazily and dropped when pickled, so grain worker processes can receive this object.
    """

    def __init__(self, path: str, dtype: str, seq_len: int):
        self.path, self.dtype, self.seq_len = path, np.dtype(dtype), seq_len
        self.num_tokens = os.path.getsize(path) // self.dtype.itemsize
        self._tokens = None

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        start = index * self.seq_len
        return np.asarray(self._tokens[start:start + self.seq_len], dtype=np.int32)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


def _windows(data_dir, split: str, seq_len: int) -> tuple[TokenWindows, dict]:
    if split not in SPLIT_FILES:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLIT_FILES)}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r}: must be an integer >= 1")
    manifest = load_manifest(data_dir)
    windows = TokenWindows(os.path.join(os.fspath(data_dir), manifest["splits"][split]["file"]), manifest["dtype"],
                           seq_len)
    if windows.num_tokens != manifest["splits"][split]["tokens"]:
        raise DataError(f"{windows.path!r} holds {windows.num_tokens} tokens but the manifest says "
                        f"{manifest['splits'][split]['tokens']}; the data dir is damaged, prepare it again")
    if len(windows) == 0:
        raise DataError(f"split {split!r} of {os.fspath(data_dir)!r} has {windows.num_tokens} tokens, fewer than "
                        f"seq_len={seq_len}; use a shorter seq_len or a bigger corpus")
    return windows, manifest


def shuffle_seed(seed: int) -> int:
    """grain seeds epoch e with ``seed + e``; hashing the user seed keeps runs with seeds s and s+1 unrelated."""
    return int.from_bytes(hashlib.sha256(f"tidar-shuffle:{seed}".encode()).digest()[:4], "big")


def _as_example(tokens_BS: np.ndarray) -> dict:
    return {"tokens": tokens_BS}


def window_stream(data_dir, seq_len: int, seed: int, split: str = "train") -> grain.MapDataset:
    """The infinite, epoch-wise shuffled window stream (item k = k-th window the run consumes, globally)."""
    windows, _ = _windows(data_dir, split, seq_len)
    return grain.MapDataset.source(windows).shuffle(seed=shuffle_seed(seed)).repeat()


class TrainIterator(grain.DatasetIterator):
    """A grain iterator yielding ``{"tokens": int32 [global_batch // process_count, seq_len]}``.

    ``get_state()`` is JSON-able and records the pipeline settings; ``set_state`` refuses a state from a different
    pipeline (other data, seq_len, batch, seed or process layout) instead of silently yielding other batches.
    Works with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` (it is a ``grain.DatasetIterator``).
    """

    def __init__(self, inner: grain.DatasetIterator, spec: dict):
        super().__init__(inner)
        self._inner = inner
        self.spec = spec

    def __next__(self) -> dict:
        return next(self._inner)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "spec": dict(self.spec), "inner": self._inner.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "inner" not in state:
            raise DataError(f"iterator state {state!r:.200}: not a TrainIterator state (version {STATE_VERSION})")
        saved = state.get("spec", {})
        differ = sorted(k for k in set(saved) | set(self.spec) if saved.get(k) != self.spec.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {self.spec.get(k)!r}" for k in differ)
            raise DataError(f"iterator state was saved by a different data pipeline ({detail}); resume with the "
                            "same data dir and settings")
        self._inner.set_state(state["inner"])

    def __str__(self) -> str:
        return f"TrainIterator({self.spec})"


def make_train_iterator(data_dir, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1, split: str = "train", prefetch: int = 2,
                        worker_count: int = 0) -> TrainIterator:
    """The training batch iterator of one process (see the module docstring for the order contract).

    prefetch: batches read ahead by a background thread (0 = read synchronously).
    worker_count: grain worker processes (0 = in-process); the batch order does not depend on it.
    """
    for name, value, low in (("global_batch", global_batch, 1), ("process_count", process_count, 1),
                             ("prefetch", prefetch, 0), ("worker_count", worker_count, 0), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{name}={value!r}: must be an integer >= {low}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index!r}: must be an integer in [0, process_count={process_count})")
    if global_batch % process_count:
        raise DataError(f"global_batch={global_batch}: must be divisible by process_count={process_count}")
    local_batch = global_batch // process_count
    windows, manifest = _windows(data_dir, split, seq_len)
    ds = (grain.MapDataset.source(windows).shuffle(seed=shuffle_seed(seed)).repeat()
          .batch(local_batch, drop_remainder=True))
    # Local batch j of process p is row-block p of global batch j: every process slices the same batched stream.
    ds = ds[process_index::process_count].map(_as_example)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if worker_count:
        from absl import flags  # grain workers read absl flags, which are unparsed outside absl.app.run

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    spec = {"fingerprint": manifest["fingerprint"], "split": split, "seq_len": seq_len,
            "global_batch": global_batch, "seed": seed, "process_index": process_index,
            "process_count": process_count, "worker_count": worker_count}
    return TrainIterator(iter(it_ds), spec)


def global_batch_from_processes(local_batches: list[np.ndarray]) -> np.ndarray:
    """The global batch of one step from the process-local batches of processes 0..P-1 (concatenation in order).

    This is the layout a sharded train step sees when each process feeds its local batch as its block of the data
    axis (e.g. ``jax.make_array_from_process_local_data(sharding, local)`` with the batch dim over all processes).
    """
    return np.concatenate([np.asarray(b) for b in local_batches], axis=0)


def eval_batches(data_dir, seq_len: int, batch_size: int, max_batches: int | None = None,
                 split: str = "eval") -> list[np.ndarray]:
    """Deterministic held-out batches: windows 0, 1, 2, ... of the split in file order, full batches only."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise DataError(f"max_batches={max_batches!r}: must be an integer >= 1 or None")
    windows, _ = _windows(data_dir, split, seq_len)
    count = len(windows) // batch_size
    if count == 0:
        raise DataError(f"split {split!r} has {len(windows)} windows of {seq_len} tokens, fewer than "
                        f"batch_size={batch_size}; use a smaller batch or seq_len")
    if max_batches is not None:
        count = min(count, max_batches)
    tokens = np.memmap(windows.path, dtype=windows.dtype, mode="r", shape=(windows.num_tokens,))
    span = batch_size * seq_len
    return [np.asarray(tokens[i * span:(i + 1) * span], dtype=np.int32).reshape(batch_size, seq_len)
            for i in range(count)]
