"""Data for training: corpus preparation (tokenize once into memory-mapped token files) and the grain pipeline.

See docs/data.md for the commands, the manifest fields and the batch-order contract.

The grain pipeline is imported on first use of one of its names, so corpus preparation, the tokenizer and the
manifest work where grain is not installed (the accelerator image has no grain; see docs/benchmarks.md).
"""

from tidar_jax.data.corpus import load_manifest, prepare_corpus, token_dtype
from tidar_jax.data.sources import DataError
from tidar_jax.data.tokenizer import load_tokenizer

_PIPELINE_NAMES = ("TokenWindows", "TrainIterator", "eval_batches", "global_batch_from_processes",
                   "make_train_iterator", "window_stream")


def __getattr__(name):
    if name in _PIPELINE_NAMES:
        from tidar_jax.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'tidar_jax.data' has no attribute {name!r}")


__all__ = ["DataError", "TokenWindows", "TrainIterator", "eval_batches", "global_batch_from_processes",
           "load_manifest", "load_tokenizer", "make_train_iterator", "prepare_corpus", "token_dtype",
           "window_stream"]
