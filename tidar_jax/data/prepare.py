"""CLI: ``python -m tidar_jax.data.prepare --out DIR [--source PATH ...] [--tokenizer PATH] [--workers N] ...``.

Tokenizes the sources (default: the running Python's stdlib) into DIR, streaming, with N worker processes, and prints
a summary. Bad input prints one line naming the problem and exits 1. A killed run resumes when run again.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tidar_jax.cli import OneLineArgumentParser
from tidar_jax.data.corpus import (DEFAULT_SHARD_TOKENS, DEFAULT_TOKENIZER_SAMPLE_BYTES, corpus_dir_problem,
                                   prepare_corpus)
from tidar_jax.data.sources import DataError


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m tidar_jax.data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--source", action="append", default=None, metavar="PATH",
                   help="directory, glob, text / .jsonl file (optionally .gz or .zst) or .parquet file; repeatable; "
                        "default: the stdlib")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL field / Parquet column holding the document text (default: text)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer worker processes (default: the available cores); the output does not depend on it")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="prepare only the I-th of N contiguous ranges of input files (needs --tokenizer); join the "
                        "parts with `python -m tidar_jax.data.merge`")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help="tokens per token file before a new one starts (default 2**28)")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=DEFAULT_TOKENIZER_SAMPLE_BYTES, metavar="N",
                   help="train the BPE on at most N bytes of the train split (default 2**30)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or an HF dir holding one; default: train a byte-level BPE on the train split")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab size of the trained BPE (default 4096)")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--max-files", type=int, default=None, help="read at most this many files")
    p.add_argument("--max-bytes", type=int, default=None, help="stop reading files once this many bytes are read")
    p.add_argument("--overwrite", action="store_true", help="replace a different corpus already in --out")
    return p


def summary(manifest: dict, out: str) -> str:
    tok = manifest["tokenizer"]
    lines = [f"prepared corpus in {out}  (fingerprint {manifest['fingerprint'][:12]})",
             f"  tokenizer: {tok['kind']}, vocab {tok['vocab_size']}, eos {tok['eos_token']}={tok['eos_token_id']}, "
             f"mask {tok['mask_token']}={tok['mask_token_id']}, dtype {manifest['dtype']}"]
    for name, s in manifest["splits"].items():
        lines.append(f"  {name:5s}: {s['documents']} documents from {s['files']} files, {s['bytes']:,} bytes, "
                     f"{s['tokens']:,} tokens" + (f" in {len(s['shards'])} shard(s)" if "shards" in s else ""))
    lines.append(f"  skipped: {len(manifest['skipped'])}" + "".join(
        f"\n    {s['path']}: {s['reason']}" for s in manifest["skipped"][:10])
        + (f"\n    ... ({len(manifest['skipped']) - 10} more in manifest.json)" if len(manifest["skipped"]) > 10 else ""))
    if manifest["ignored_extensions"]:
        lines.append(f"  ignored by extension: {manifest['ignored_extensions']}")
    if manifest["truncated"]["by"]:
        lines.append(f"  not read ({manifest['truncated']['by']}): {manifest['truncated']['files_not_read']} files")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    from tidar_jax.output_paths import OutputPathError, check_output_dir

    try:  # before any input is read: a path that is a file, under a file, read-only, full or a damaged corpus
        check_output_dir(args.out, existing=(lambda path: None) if args.overwrite else corpus_dir_problem)
    except OutputPathError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        manifest = prepare_corpus(args.out, sources=args.source, tokenizer=args.tokenizer,
                                  vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
                                  max_files=args.max_files, max_bytes=args.max_bytes, overwrite=args.overwrite,
                                  text_field=args.text_field, workers=args.workers, shard=args.shard,
                                  shard_tokens=args.shard_tokens, tokenizer_sample_bytes=args.tokenizer_sample_bytes)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
