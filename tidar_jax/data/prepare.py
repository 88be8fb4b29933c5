"""CLI: ``python -m tidar_jax.data.prepare --out DIR [--source PATH ...] [--tokenizer PATH] [--vocab-size N]``.

Tokenizes the sources (default: the running Python's stdlib) into DIR and prints a summary. Bad input prints one
line naming the problem and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tidar_jax.data.corpus import prepare_corpus
from tidar_jax.data.sources import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidar_jax.data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--source", action="append", default=None, metavar="PATH",
                   help="directory, glob, text file or .jsonl file (field 'text'); repeatable; default: stdlib")
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
                     f"{s['tokens']:,} tokens")
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
    try:
        manifest = prepare_corpus(args.out, sources=args.source, tokenizer=args.tokenizer,
                                  vocab_size=args.vocab_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
                                  max_files=args.max_files, max_bytes=args.max_bytes, overwrite=args.overwrite)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
