"""Data for training: corpus preparation (tokenize once into sharded memory-mapped token files), document packing,
weighted mixtures and the grain pipeline.

See docs/data.md for the commands, the manifest fields and the batch-order contract. Names are imported on first use
so that preparation worker processes (which import ``tidar_jax.data.encode``) do not load grain or JAX, and so that
corpus preparation, the tokenizer and the manifest work where grain is not installed (the accelerator image has no
grain; see docs/benchmarks.md).
"""

import importlib

_EXPORTS = {
    "DataError": "sources",
    "load_manifest": "corpus", "prepare_corpus": "corpus", "token_dtype": "corpus",
    "PackedDocuments": "packing",
    "PACKINGS": "pipeline", "TokenWindows": "pipeline", "TrainIterator": "pipeline", "eval_batches": "pipeline",
    "eval_examples": "pipeline", "global_batch_from_processes": "pipeline", "make_train_iterator": "pipeline",
    "window_stream": "pipeline",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"tidar_jax.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tidar_jax.data' has no attribute {name!r}")
