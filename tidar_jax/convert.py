"""Checkpoint conversion CLI.

    python -m tidar_jax.convert import-hf HF_DIR OUT [--mask-token-id N | --add-mask-token] [--block-size B]
                                                     [--dtype float32|bfloat16|float16]
    python -m tidar_jax.convert export-hf CHECKPOINT OUT_DIR [--dtype ...] [--max-shard-size 5GB] [--for sglang-tidar]
                                         [--generation-config FILE] [--chat-template FILE]

``import-hf`` writes a params checkpoint (``tidar_jax.checkpoint.params``) that ``train.py`` can start from and
``decode.py`` can load. ``export-hf`` takes a run dir, a step checkpoint or a params checkpoint and writes an HF
directory loadable by ``transformers.AutoModelForCausalLM.from_pretrained``; ``--for sglang-tidar`` writes the
directory the authors' SGLang TiDAR server loads (``tidar_jax.hf.sglang_tidar``, docs/hf.md), with a README that
gives the server command line. Both keep what the source model's directory gave a server beside the weights (chat
template, generation config, EOS ids, context length; ``tidar_jax.hf.serving``), and print the trained block size
the server must be given. Bad input exits non-zero with one line; nothing is written. The output path is checked before anything is read (``tidar_jax.output_paths``).
"""

from __future__ import annotations

import argparse
import re
import sys

from tidar_jax.cli import OneLineArgumentParser

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
    p = OneLineArgumentParser(prog="python -m tidar_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face dir -> params checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    group = imp.add_mutually_exclusive_group()
    group.add_argument("--mask-token-id", type=int, default=None,
                       help="existing token id to use as [MASK] (default: recorded, or 151662 for Qwen vocabularies)")
    group.add_argument("--add-mask-token", action="store_true",
                       help="append <|mask|> to the tokenizer (grows the embedding if it has no free row)")
    imp.add_argument("--block-size", type=int, default=None,
                     help="the block size the weights were trained with (default: the one recorded in config.json; "
                          "none recorded: an AR model, decoded with --mode ar or an explicit untrained block size)")
    imp.add_argument("--dtype", choices=_DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")
    exp = sub.add_parser("export-hf", help="run dir / checkpoint dir -> Hugging Face dir")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--dtype", choices=_DTYPES, default=None,
                     help="dtype written (default: the params'; bfloat16 with --for sglang-tidar)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    exp.add_argument("--for", dest="target", choices=("sglang-tidar",), default=None,
                     help="serving stack to write for: sglang-tidar = the authors' SGLang TiDAR server "
                          "(Qwen2/Qwen3 only, mask token 151662); default: a plain transformers directory")
    exp.add_argument("--generation-config", default=None, metavar="FILE",
                     help="generation_config.json to write (default: the source model's, carried by the "
                          "checkpoint; --for sglang-tidar needs one)")
    exp.add_argument("--chat-template", default=None, metavar="FILE",
                     help="Jinja chat template to write (default: the source model's, carried by the checkpoint)")
    return p


def import_hf(hf_dir: str, out: str, mask_token_id=None, add_mask_token=False, block_size=None, dtype=None) -> str:
    from tidar_jax.checkpoint.metadata import CheckpointMeta, eos_tuple
    from tidar_jax.checkpoint.params import save_params
    from tidar_jax.hf import load_hf_dir
    from tidar_jax.hf.load import read_hf_config
    from tidar_jax.hf.serving import read_source_record
    from tidar_jax.output_paths import check_new_dir

    check_new_dir(out)
    record = read_source_record(hf_dir, read_hf_config(hf_dir))
    bundle = load_hf_dir(hf_dir, mask_token_id=mask_token_id, block_size=block_size, dtype=dtype,
                         add_mask_token=add_mask_token, require_mask_token=True)
    # every EOS id (the first is the default); the serving record is kept so that export-hf writes it back
    meta = CheckpointMeta(bundle.config, eos_token_ids=eos_tuple(bundle.eos_token_ids), source=bundle.source,
                          hf=record)
    # the tokenizer object may carry an added <|mask|>, so it is saved, not the source file
    return save_params(out, meta, bundle.params, tokenizer=bundle.tokenizer)


def export_checkpoint(checkpoint: str, out_dir: str, dtype=None, max_shard_bytes=None, target=None,
                      generation_config=None, chat_template=None) -> tuple[str, int | None]:
    """``(out_dir, the trained block size)``. ``generation_config`` / ``chat_template``: files that replace the
    ones the checkpoint carries from its source model (``tidar_jax.hf.serving``)."""
    from tidar_jax.hf import export_hf
    from tidar_jax.hf import sglang_tidar, serving
    from tidar_jax.hf.export import DEFAULT_MAX_SHARD_BYTES
    from tidar_jax.loading import checkpoint_kind, serving_record
    from tidar_jax.output_paths import check_new_dir

    if target not in (None, sglang_tidar.TARGET):
        raise ValueError(f"--for {target!r}: expected {sglang_tidar.TARGET}")
    check_new_dir(out_dir)
    kind = checkpoint_kind(checkpoint)
    record = serving.with_overrides(serving_record(checkpoint), generation_config, chat_template)
    if target == sglang_tidar.TARGET:  # refused before the weights are read
        if kind != "hf":
            sglang_tidar.check_servable(*_record(checkpoint, kind))
        sglang_tidar.check_generation_config(record)
    bundle = _load_bundle(checkpoint)
    fields = serving.export_fields(record, bundle.eos_token_ids or bundle.eos_token_id)
    extra = {}
    if target == sglang_tidar.TARGET:  # refused before anything is written
        sglang_tidar.check_servable(bundle.config, bundle.tokenizer)
        dtype = dtype or sglang_tidar.DEFAULT_DTYPE
        extra = {"config_extra": sglang_tidar.config_overrides(bundle.config, dtype),
                 "extra_files": {sglang_tidar.README: sglang_tidar.readme(out_dir, bundle.config, dtype,
                                                                          bundle.source or checkpoint, fields)}}
    out = export_hf(bundle.config, bundle.params, out_dir, tokenizer=bundle.tokenizer, dtype=dtype,
                    max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, **fields, **extra)
    return out, bundle.config.block_size


def _load_bundle(checkpoint: str):
    """``load_for_inference(checkpoint)``; a library error from damaged files (orbax, tensorstore) becomes one
    line."""
    from tidar_jax.checkpoint.metadata import DamagedCheckpoint
    from tidar_jax.config import ConfigError
    from tidar_jax.hf.keys import HFFormatError
    from tidar_jax.loading import CheckpointNotFound, load_for_inference

    try:
        return load_for_inference(checkpoint)
    except (HFFormatError, ConfigError, DamagedCheckpoint, CheckpointNotFound):
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DamagedCheckpoint(f"checkpoint {checkpoint!r} could not be loaded: {type(e).__name__}: {first}") \
            from None


def _record(checkpoint: str, kind: str):
    """``(ModelConfig, tokenizer or None)`` of a params checkpoint or run dir, without reading its weights."""
    import os

    from tidar_jax.checkpoint import read_meta
    from tidar_jax.checkpoint.params import TOKENIZER
    from tidar_jax.checkpoint.run import run_and_steps

    directory = checkpoint if kind == "params" else run_and_steps(checkpoint)[0]
    tok_path = os.path.join(directory, TOKENIZER)
    tokenizer = None
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tok_path)
    return read_meta(directory).config, tokenizer


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from tidar_jax.config import ConfigError
    from tidar_jax.loading import CheckpointNotFound
    from tidar_jax.hf.keys import HFFormatError
    from tidar_jax.checkpoint.metadata import DamagedCheckpoint
    from tidar_jax.output_paths import OutputPathError

    try:
        if args.command == "import-hf":
            out = import_hf(args.hf_dir, args.out, args.mask_token_id, args.add_mask_token, args.block_size,
                            args.dtype)
        else:
            out, block_size = export_checkpoint(args.checkpoint, args.out_dir, args.dtype,
                                                parse_size(args.max_shard_size), args.target,
                                                args.generation_config, args.chat_template)
    except (HFFormatError, ConfigError, CheckpointNotFound, OutputPathError, DamagedCheckpoint, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    if args.command == "export-hf":
        from tidar_jax.hf import sglang_tidar

        print(sglang_tidar.block_size_notice(block_size, out if args.target else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
