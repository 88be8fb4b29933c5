"""Checkpoint conversion CLI.

    python -m tidar_jax.convert import-hf HF_DIR OUT [--mask-token-id N | --add-mask-token] [--block-size B]
                                                     [--dtype float32|bfloat16|float16]
    python -m tidar_jax.convert export-hf CHECKPOINT OUT_DIR [--dtype ...] [--max-shard-size 5GB]

``import-hf`` writes a params checkpoint (``tidar_jax.params_io``) that ``train.py`` can start from and
``decode.py`` can load. ``export-hf`` takes a run dir, a step checkpoint or a params checkpoint and writes an HF
directory loadable by ``transformers.AutoModelForCausalLM.from_pretrained``. Bad input exits non-zero with one
line; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2,
               "GIB": 1024 ** 3}
_DTYPES = ("float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS or int(match.group(1)) < 1:
        raise SystemExit(f"error: --max-shard-size={text!r}: expected a positive size such as 500MB, 5GB or 2GiB")
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidar_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face dir -> params checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    group = imp.add_mutually_exclusive_group()
    group.add_argument("--mask-token-id", type=int, default=None,
                       help="existing token id to use as [MASK] (default: recorded, or 151662 for Qwen vocabularies)")
    group.add_argument("--add-mask-token", action="store_true",
                       help="append <|mask|> to the tokenizer (grows the embedding if it has no free row)")
    imp.add_argument("--block-size", type=int, default=None, help="draft block size (default: recorded, else 16)")
    imp.add_argument("--dtype", choices=_DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")
    exp = sub.add_parser("export-hf", help="run dir / checkpoint dir -> Hugging Face dir")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--dtype", choices=_DTYPES, default=None, help="dtype written (default: the params')")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    return p


def import_hf(hf_dir: str, out: str, mask_token_id=None, add_mask_token=False, block_size=None, dtype=None) -> str:
    from tidar_jax.hf import load_hf_dir
    from tidar_jax.hf.load import read_hf_config, token_ids
    from tidar_jax.params_io import save_params

    if os.path.exists(out):
        raise FileExistsError(f"output {os.path.abspath(out)} already exists; choose a new path or remove it first")
    bundle = load_hf_dir(hf_dir, mask_token_id=mask_token_id, block_size=block_size, dtype=dtype,
                         add_mask_token=add_mask_token)
    hf = read_hf_config(hf_dir)
    extra = {"trained_block_size": bundle.trained_block_size, "eos_token_id": bundle.eos_token_id,
             "source": bundle.source,
             # HF-only fields kept so that export-hf can write them back
             "hf": {"max_position_embeddings": hf.get("max_position_embeddings"), **token_ids(hf_dir, hf)}}
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = None
        if bundle.tokenizer is not None:  # may carry an added <|mask|>, so save the object, not the source file
            tok_path = os.path.join(tmp, "tokenizer.json")
            bundle.tokenizer.save(tok_path)
        return save_params(out, bundle.config, bundle.params, tokenizer_path=tok_path, extra=extra)


def export_checkpoint(checkpoint: str, out_dir: str, dtype=None, max_shard_bytes=None) -> str:
    from tidar_jax.hf import export_hf
    from tidar_jax.hf.export import DEFAULT_MAX_SHARD_BYTES
    from tidar_jax.loading import load_for_inference

    if os.path.exists(out_dir):
        raise FileExistsError(f"output {os.path.abspath(out_dir)} already exists; choose a new path or remove it first")
    bundle = load_for_inference(checkpoint)
    hf_fields = {}
    meta_path = os.path.join(checkpoint, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            hf_fields = json.load(f).get("hf") or {}
    eos = hf_fields.get("eos_token_id", bundle.eos_token_id)
    return export_hf(bundle.config, bundle.params, out_dir, tokenizer=bundle.tokenizer, dtype=dtype,
                     max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, eos_token_id=eos,
                     bos_token_id=hf_fields.get("bos_token_id"),
                     max_position_embeddings=hf_fields.get("max_position_embeddings"))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from tidar_jax.config import ConfigError
    from tidar_jax.hf.keys import HFFormatError
    from tidar_jax.loading import CheckpointNotFound

    try:
        if args.command == "import-hf":
            out = import_hf(args.hf_dir, args.out, args.mask_token_id, args.add_mask_token, args.block_size,
                            args.dtype)
        else:
            out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, parse_size(args.max_shard_size))
    except (HFFormatError, ConfigError, CheckpointNotFound, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
