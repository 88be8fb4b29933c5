"""The grain input pipeline over prepared corpora: fixed-length windows or packed documents (segment ids), weighted
mixtures, seeded shuffle, process sharding, batching.

Order contract (what makes multi-process runs reproduce single-process runs):
  * window i of a split is ``tokens[i*S:(i+1)*S]`` of its token stream (non-overlapping; the tail shorter than S is
    unused); with ``packing="documents"`` the stream is the packed-document stream of ``tidar_jax.data.packing``;
  * a mixture interleaves its sources' streams deterministically by weight (``grain.MapDataset.mix``);
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
from tidar_jax.data.packing import PackedDocuments
from tidar_jax.data.shards import TokenStream, document_spans, split_parts
from tidar_jax.data.sources import DataError

STATE_VERSION = 1
PACKINGS = ("windows", "documents")


class TokenWindows:
    """Random-access source of non-overlapping ``seq_len`` windows of a split's token stream (int32 copies).

    Memmaps are opened lazily and dropped when pickled, so grain worker processes can receive this object.
    """

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.num_tokens = stream.num_tokens

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        return self.stream.read(start, start + self.seq_len)


def _check_split(split: str, seq_len: int) -> None:
    if split not in SPLIT_FILES:
        raise DataError(f"split={split!r}: must be one of {', '.join(SPLIT_FILES)}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r}: must be an integer >= 1")


def _stream(data_dir, split: str) -> tuple[TokenStream, dict]:
    manifest = load_manifest(data_dir)
    stream = TokenStream(split_parts(os.fspath(data_dir), manifest, split), manifest["dtype"])
    for part in stream.parts:
        size = os.path.getsize(part["path"]) if os.path.isfile(part["path"]) else -1
        if size != part["tokens"] * stream.dtype.itemsize:
            raise DataError(f"{part['path']!r} holds {max(size, 0) // stream.dtype.itemsize} tokens but the manifest "
                            f"says {part['tokens']}; the data dir is damaged, prepare it again")
    return stream, manifest


def _windows(data_dir, split: str, seq_len: int) -> tuple[TokenWindows, dict]:
    _check_split(split, seq_len)
    stream, manifest = _stream(data_dir, split)
    windows = TokenWindows(stream, seq_len)
    if len(windows) == 0:
        raise DataError(f"split {split!r} of {os.fspath(data_dir)!r} has {windows.num_tokens} tokens, fewer than "
                        f"seq_len={seq_len}; use a shorter seq_len or a bigger corpus")
    return windows, manifest


def _packed(data_dir, split: str, seq_len: int, block_size: int) -> tuple[PackedDocuments, dict]:
    _check_split(split, seq_len)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1 or seq_len % block_size:
        raise DataError(f"block_size={block_size!r}: must be an integer >= 1 that divides seq_len={seq_len}")
    stream, manifest = _stream(data_dir, split)
    source = PackedDocuments(stream, document_spans(os.fspath(data_dir), manifest, split), seq_len, block_size,
                             int(manifest["eos_token_id"]))
    if len(source) == 0:
        raise DataError(f"split {split!r} of {os.fspath(data_dir)!r} packs into {source.num_tokens} tokens, fewer "
                        f"than seq_len={seq_len}; use a shorter seq_len or a bigger corpus")
    return source, manifest


def _source(data_dir, split: str, seq_len: int, packing: str, block_size: int):
    if packing == "windows":
        return _windows(data_dir, split, seq_len)
    if packing == "documents":
        return _packed(data_dir, split, seq_len, block_size)
    raise DataError(f"packing={packing!r}: must be one of {', '.join(PACKINGS)}")


def shuffle_seed(seed: int) -> int:
    """grain seeds epoch e with ``seed + e``; hashing the user seed keeps runs with seeds s and s+1 unrelated."""
    return int.from_bytes(hashlib.sha256(f"tidar-shuffle:{seed}".encode()).digest()[:4], "big")


def _as_example(tokens_NS) -> dict:
    return tokens_NS if isinstance(tokens_NS, dict) else {"tokens": tokens_NS}


def mixture_seed(seed: int, index: int) -> int:
    """The shuffle seed of mixture component ``index`` (component 0 of a one-source run keeps ``shuffle_seed``)."""
    if index == 0:
        return shuffle_seed(seed)
    return int.from_bytes(hashlib.sha256(f"tidar-shuffle:{seed}:{index}".encode()).digest()[:4], "big")


def window_stream(data_dir, seq_len: int, seed: int, split: str = "train", packing: str = "windows",
                  block_size: int = 1) -> grain.MapDataset:
    """The infinite, epoch-wise shuffled stream (item k = k-th example the run consumes, globally).

    ``data_dir`` may be a list of ``(dir, weight)`` pairs: a weighted mixture. Each source is shuffled epoch by
    epoch with its own seed and repeated; ``grain.MapDataset.mix`` interleaves them deterministically in proportion
    to the weights, so the stream stays random-access (exact resume, process slicing).
    """
    sources = normalize_sources(data_dir)
    comps = []
    for i, (d, _) in enumerate(sources):
        source, _ = _source(d, split, seq_len, packing, block_size)
        comps.append(grain.MapDataset.source(source).shuffle(seed=mixture_seed(seed, i)).repeat())
    if len(comps) == 1:
        return comps[0]
    return grain.MapDataset.mix(comps, [w for _, w in sources])


def normalize_sources(data_dir) -> list[tuple[str, float]]:
    """``dir`` -> ``[(dir, 1.0)]``; a list of ``(dir, weight)`` / ``{"dir", "weight"}`` is checked and returned."""
    if isinstance(data_dir, (str, os.PathLike)):
        return [(os.fspath(data_dir), 1.0)]
    out = []
    for item in data_dir:
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"dir", "weight"})
            if unknown or "dir" not in item:
                raise DataError(f"data source {item!r}: expected keys dir and weight")
            d, w = item["dir"], item.get("weight", 1.0)
        else:
            d, w = item
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise DataError(f"data source {d!r}: weight={w!r} must be a number > 0")
        out.append((os.fspath(d), float(w)))
    if not out:
        raise DataError("data sources=[]: give at least one prepared data dir")
    return out


def mixture_manifests(sources: list[tuple[str, float]]) -> list[dict]:
    """The manifests of the sources; DataError unless they share one tokenizer (the ids must mean the same)."""
    manifests = [load_manifest(d) for d, _ in sources]
    first = manifests[0].get("tokenizer", {}).get("sha256")
    for (d, _), m in zip(sources[1:], manifests[1:]):
        if m.get("tokenizer", {}).get("sha256") != first:
            raise DataError(f"data source {d!r} uses another tokenizer than {sources[0][0]!r} (tokenizer.json sha256 "
                            "differs); prepare every source with the same --tokenizer")
    return manifests


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
                        worker_count: int = 0, packing: str = "windows", block_size: int = 1) -> TrainIterator:
    """The training batch iterator of one process (see the module docstring for the order contract).

    data_dir: a prepared dir, or a list of ``(dir, weight)`` for a weighted mixture (same tokenizer everywhere).
    prefetch: batches read ahead by a background thread (0 = read synchronously).
    worker_count: grain worker processes (0 = in-process); the batch order does not depend on it.
    packing: "windows" (``{"tokens"}``, windows may span documents) or "documents" (``{"tokens", "segment_ids"}``,
      see ``tidar_jax.data.packing``; documents start on ``block_size`` boundaries).
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
    sources = normalize_sources(data_dir)
    manifests = mixture_manifests(sources)
    ds = window_stream(data_dir, seq_len, seed, split, packing, block_size).batch(local_batch, drop_remainder=True)
    # Local batch j of process p is row-block p of global batch j: every process slices the same batched stream.
    ds = ds[process_index::process_count].map(_as_example)
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if worker_count:
        from absl import flags  # grain workers read absl flags, which are unparsed outside absl.app.run

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    spec = {"fingerprint": manifests[0]["fingerprint"], "split": split, "seq_len": seq_len,
            "global_batch": global_batch, "seed": seed, "process_index": process_index,
            "process_count": process_count, "worker_count": worker_count}
    if packing != "windows":  # absent for windows, so states saved before packing existed still match
        spec.update(packing=packing, block_size=block_size)
    if len(sources) > 1:
        spec["mixture"] = [[m["fingerprint"], w] for m, (_, w) in zip(manifests, sources)]
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
    span = batch_size * seq_len
    return [windows.stream.read(i * span, (i + 1) * span).reshape(batch_size, seq_len) for i in range(count)]


def eval_examples(data_dir, seq_len: int, batch_size: int, max_batches: int | None = None, split: str = "eval",
                  packing: str = "windows", block_size: int = 1) -> list[dict]:
    """Deterministic held-out batches as dicts: ``{"tokens"}`` (windows, same rows as ``eval_batches``) or
    ``{"tokens", "segment_ids"}`` (documents: packed windows 0, 1, 2, ... in order)."""
    if packing == "windows":
        return [{"tokens": b} for b in eval_batches(data_dir, seq_len, batch_size, max_batches, split)]
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: must be an integer >= 1")
    source, _ = _source(data_dir, split, seq_len, packing, block_size)
    count = len(source) // batch_size
    if count == 0:
        raise DataError(f"split {split!r} packs into {len(source)} sequences of {seq_len} tokens, fewer than "
                        f"batch_size={batch_size}; use a smaller batch or seq_len")
    if max_batches is not None:
        count = min(count, max_batches)
    out = []
    for b in range(count):
        rows = [source[b * batch_size + r] for r in range(batch_size)]
        out.append({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    return out
