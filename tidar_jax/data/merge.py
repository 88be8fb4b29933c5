"""Join the parts of a sharded preparation (``prepare --shard i/n``) into one dataset, without copying tokens.

``python -m tidar_jax.data.merge --out DIR PART_0 ... PART_{n-1}`` writes DIR with a manifest whose shards point at
the parts' token files (relative paths), the tokenizer, and a ``documents.jsonl`` with offsets in the joined streams.
The joined dataset reads exactly like an unsharded preparation of the same inputs (same token streams, documents and
counts), except where the unsharded run's "both splits non-empty" rule for tiny corpora forced a document's split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid

from tidar_jax.checkpoint.atomic import publish_dir
from tidar_jax.cli import OneLineArgumentParser
from tidar_jax.data import tokenizer as tk
from tidar_jax.data.corpus import DOCUMENTS, FORMAT_VERSION, MANIFEST, SPLITS, _write_manifest, load_manifest
from tidar_jax.data.sources import DataError


def merge_parts(out_dir, part_dirs) -> dict:
    out_dir = os.path.abspath(os.fspath(out_dir))
    parts = [os.path.abspath(os.fspath(p)) for p in part_dirs]
    if not parts:
        raise DataError("no parts given: pass the output dirs of `prepare --shard i/n` for every i")
    manifests = [load_manifest(p) for p in parts]
    for p, m in zip(parts, manifests):
        if m.get("format_version") != FORMAT_VERSION or "shard" not in m:
            raise DataError(f"{p}: not a format-{FORMAT_VERSION} preparation (prepare it again with this code)")
    count = manifests[0]["shard"]["count"]
    indexes = sorted(m["shard"]["index"] for m in manifests)
    if indexes != list(range(count)) or any(m["shard"]["count"] != count for m in manifests):
        raise DataError(f"parts {[m['shard'] for m in manifests]}: need exactly shards 0..n-1 of one n (got indexes "
                        f"{indexes} of n={count})")
    order = sorted(range(len(parts)), key=lambda i: manifests[i]["shard"]["index"])
    parts, manifests = [parts[i] for i in order], [manifests[i] for i in order]

    def comparable(m):
        return {k: v for k, v in m["settings"].items() if k != "shard"}

    for p, m in zip(parts[1:], manifests[1:]):
        if comparable(m) != comparable(manifests[0]) or m["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
            raise DataError(f"{p}: prepared with other settings or another tokenizer than {parts[0]}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise DataError(f"out_dir {out_dir!r} exists and is not empty; choose a new directory")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        splits = {s: {"shards": [], "documents": 0, "files": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
        with open(os.path.join(tmp, DOCUMENTS), "w") as out_docs:
            for p, m in zip(parts, manifests):
                base = {s: splits[s]["tokens"] for s in SPLITS}
                for s in SPLITS:
                    info = m["splits"][s]
                    for shard in info["shards"]:
                        splits[s]["shards"].append(
                            {**shard, "file": os.path.relpath(os.path.join(p, shard["file"]), out_dir),
                             "docs_file": os.path.relpath(os.path.join(p, shard["docs_file"]), out_dir)})
                    for k in ("documents", "files", "bytes", "tokens"):
                        splits[s][k] += info[k]
                with open(os.path.join(p, m["documents_file"])) as f:
                    for line in f:
                        row = json.loads(line)
                        row["offset"] += base[row["split"]]
                        out_docs.write(json.dumps(row) + "\n")
        shutil.copyfile(os.path.join(parts[0], tk.TOKENIZER_FILE), os.path.join(tmp, tk.TOKENIZER_FILE))
        first = manifests[0]
        manifest = {
            **{k: first[k] for k in ("format", "format_version", "tokenizer", "vocab_size", "eos_token_id",
                                     "mask_token_id", "dtype", "documents_file", "python")},
            "fingerprint": hashlib.sha256("".join(m["fingerprint"] for m in manifests).encode()).hexdigest(),
            "corpus_fingerprint": hashlib.sha256(
                "".join(m["corpus_fingerprint"] for m in manifests).encode()).hexdigest(),
            "settings": {**comparable(first), "shard": [0, 1]},
            "merged_from": [os.path.relpath(p, out_dir) for p in parts],
            "sources": first["sources"],
            "shard": {"index": 0, "count": 1},
            "splits": splits,
            "files": {k: sum(m["files"][k] for m in manifests) for k in first["files"]},
            "skipped": [s for m in manifests for s in m["skipped"]],
            "ignored_extensions": first["ignored_extensions"],
            "truncated": first["truncated"],
        }
        _write_manifest(os.path.join(tmp, MANIFEST), manifest)
        if not publish_dir(tmp, out_dir):
            raise OSError(f"{out_dir}: not empty")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="python -m tidar_jax.data.merge", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the joined dataset (a new directory)")
    p.add_argument("parts", nargs="+", help="the output dirs of `prepare --shard i/n`, one per i")
    args = p.parse_args(argv)
    try:
        m = merge_parts(args.out, args.parts)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"merged {len(args.parts)} parts into {args.out}: " + ", ".join(
        f"{s} {m['splits'][s]['documents']} documents / {m['splits'][s]['tokens']:,} tokens" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
