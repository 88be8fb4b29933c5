"""Data for training: corpus preparation (tokenize once into memory-mapped token files) and the grain pipeline.

See docs/data.md for the commands, the manifest fields and the batch-order contract.
"""

from tidar_jax.data.corpus import load_manifest, prepare_corpus, token_dtype
from tidar_jax.data.packing import PackedDocuments
from tidar_jax.data.pipeline import (PACKINGS, TokenWindows, TrainIterator, eval_batches, eval_examples,
                                     global_batch_from_processes, make_train_iterator, window_stream)
from tidar_jax.data.sources import DataError
from tidar_jax.data.tokenizer import load_tokenizer

__all__ = ["DataError", "PACKINGS", "PackedDocuments", "TokenWindows", "eval_examples", "TrainIterator", "eval_batches", "global_batch_from_processes",
           "load_manifest", "load_tokenizer", "make_train_iterator", "prepare_corpus", "token_dtype",
           "window_stream"]
