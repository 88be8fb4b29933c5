#!/usr/bin/env python
"""Decode with a TiDAR checkpoint (or its AR baseline) from the command line.

    python decode.py --checkpoint CKPT --prompt "def fib(n):" --max-new-tokens 64
    python decode.py --checkpoint CKPT --prompt-file prompt.txt --compare
    echo "hello" | python decode.py --checkpoint CKPT --json
    python decode.py --plan --target h100 --preset qwen2.5-1.5b --batch 1 --block-size 16 --context 1024

Text streams to stdout (in a terminal, each accepted chunk in an alternating colour); stats go to stderr.
``--json`` prints exactly one JSON object on stdout instead. Bad input exits non-zero with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tidar_jax.cli import OneLineArgumentParser
from tidar_jax.config import CACHE_ATTENTION, DEFAULT_BLOCK_SIZE

COMPILED_RECOMMENDATION = "<compiled>"  # --recommendation without a file: recommend from the compiled steps

COLOURS = ("\033[36m", "\033[33m")
RESET = "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="params checkpoint, training run dir, HF dir or "
                                                        "pretrained:NAME (fetched once; tidar_jax.pretrained) "
                                                        "(required unless --plan)")
    p.add_argument("--add-mask-token", action="store_true",
                   help="an HF dir without a [MASK] token: append an untrained <|mask|> (TiDAR mode runs, its "
                        "drafts are rejected until trained; AR mode needs no mask token)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="UTF-8 prompt file ('-' = stdin)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids (for checkpoints without a tokenizer)")
    p.add_argument("--mode", default="tidar", help="tidar | ar (default tidar)")
    p.add_argument("--block-size", type=int, default=None, help="draft length B (default: the trained one)")
    p.add_argument("--allow-untrained-block-size", action="store_true",
                   help="allow a block size other than the one the checkpoint was trained with")
    p.add_argument("--beta", type=float, default=1.0, help="verifier mix: 1 = trust AR, 0 = trust diffusion")
    p.add_argument("--slot0", default="verifier",
                   help="verifier (lossless with beta=1) | diffusion (the authors' code)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--eos-token-id", default=None,
                   help="EOS id(s), comma-separated (default: every EOS id of the checkpoint; -1 = none)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable): stop at its first occurrence in the generated text")
    p.add_argument("--stop-ids", action="append", default=None,
                   help="stop token sequence, comma-separated ids (repeatable)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weight/compute dtype, cast once at load (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16"),
                   help="KV-cache dtype (default: the compute dtype)")
    p.add_argument("--cache-attention", default="auto", choices=CACHE_ATTENTION,
                   help="decode-step cache attention (default auto: fused on GPU, tpu on TPU, paged on CPU; dense: "
                        "the reference kernel over the whole cache; docs/attention.md)")
    p.add_argument("--mesh", default=None,
                   help="data=D,fsdp=F,tensor=T: shard params and KV cache over D*F*T devices (default: one)")
    p.add_argument("--groups", default=None,
                   help="mask groups drafted per step: G (accepted counts 1..G) or a comma list of counts "
                        "(default: all B)")
    p.add_argument("--head", default=None, choices=("selective", "one_pass"),
                   help="LM-head strategy per step (default one_pass)")
    p.add_argument("--recommendation", default=None, nargs="?", const=COMPILED_RECOMMENDATION,
                   help="JSON written by benchmarks/free_slots.py: use its block size, groups and head (explicit "
                        "--block-size/--groups/--head win). Without a file, with --target and --preset: compile the "
                        "TiDAR step for each B in --blocks (all groups and groups 1..B/2) and recommend the best by "
                        "the cost model's projected tokens/s (docs/decode.md)")
    p.add_argument("--max-cache-len", type=int, default=4096, help="KV cache slots (prompt + new + B)")
    p.add_argument("--compare", action="store_true", help="also run AR on the same prompt and compare")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    plan = p.add_argument_group("plan (compile for a target without weights; docs/decode.md)")
    plan.add_argument("--plan", action="store_true",
                      help="compile prefill and one step of AR and TiDAR for --target without weights; print kernels "
                           "per step and per layer, while loops and trip counts, host round trips and memory")
    plan.add_argument("--target", default=None,
                      help="with --plan: h100, h200, a100, b200 (xN), or a TPU slice (v5e-4, v5p-8, v6e-4)")
    plan.add_argument("--preset", default=None, help="with --plan: model shape (qwen2.5-1.5b, qwen3-8b)")
    plan.add_argument("--hf-config", default=None, help="with --plan: an HF config.json instead of --preset")
    plan.add_argument("--batch", type=int, default=1, help="with --plan: rows per step (default 1)")
    plan.add_argument("--context", type=int, default=1024,
                      help="with --plan: prompt length and the live cache length of the step (default 1024)")
    plan.add_argument("--cache-page", type=int, default=128, help="with --plan: paged-attention page (default 128)")
    plan.add_argument("--estimate", action="store_true",
                      help="with --plan: add each program's time, ceiling and expected (docs/estimates.md), and on GPU "
                           "XLA's own cost model beside ours")
    plan.add_argument("--tokens-per-nfe", default=None,
                      help="with --estimate: TiDAR tokens per forward to project tokens/s and the speedup (the paper: "
                           "7.45 at 1.5B, 8.25 at 8B), or per B as B=T,... (e.g. 4=3.1,8=5.0,16=7.45; with "
                           "--recommendation: all groups)")
    plan.add_argument("--acceptance", type=float, default=None,
                      help="with --recommendation: per-slot draft acceptance rate in [0, 1) instead of "
                           "--tokens-per-nfe (default: the paper's T/NFE at B=16 for the preset)")
    plan.add_argument("--blocks", default="4,8,16",
                      help="with --recommendation: block sizes to compare (default 4,8,16)")
    return p


def read_prompt(args) -> tuple[str | None, list[int] | None]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise SystemExit(f"--prompt-ids={args.prompt_ids!r}: must be comma-separated integers")
        return None, ids
    if args.prompt is not None:
        return args.prompt, None
    if args.prompt_file is not None and args.prompt_file != "-":
        if not os.path.isfile(args.prompt_file):
            what = "is a directory, not a file" if os.path.isdir(args.prompt_file) else "no such file"
            raise SystemExit(f"--prompt-file={args.prompt_file!r}: {what}")
        with open(args.prompt_file, "rb") as f:
            raw, where = f.read(), args.prompt_file
    elif args.prompt_file == "-" or not sys.stdin.isatty():
        raw, where = sys.stdin.buffer.read(), "stdin"
    else:
        raise SystemExit("no prompt: give --prompt, --prompt-file, --prompt-ids or pipe text on stdin")
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        raise SystemExit(f"prompt from {where} is not valid UTF-8 (byte {e.start}): only UTF-8 text is accepted")


def parse_mesh(text):
    """``data=D,fsdp=F,tensor=T`` (any subset; missing axes = 1) -> dict."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise SystemExit(f"--mesh={text!r}: must be data=D,fsdp=F,tensor=T with positive integers")
        sizes[name.strip()] = int(value)
    return sizes


def parse_ids(text, flag):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: must be comma-separated integers")
    if not ids:
        raise SystemExit(f"{flag}={text!r}: must be comma-separated integers")
    return ids


def apply_recommendation(args):
    """Fill --block-size / --groups / --head from a free_slots recommendation where they were not given."""
    if args.recommendation is None:
        return
    try:
        with open(args.recommendation) as f:
            obj = json.load(f)
        rec = obj.get("recommendation", obj)
        block, groups = int(rec["best_block_size"]), rec.get("best_groups")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"--recommendation={args.recommendation!r}: not a free_slots recommendation "
                         f"({type(e).__name__}: {e})")
    if args.block_size is None:
        args.block_size = block
        if args.groups is None and groups:
            args.groups = ",".join(str(g) for g in groups)
    if args.head is None and rec.get("head"):
        args.head = rec["head"]


def parse_groups(text):
    if text is None:
        return None
    ids = parse_ids(text, "--groups")
    return ids[0] if len(ids) == 1 and "," not in text else ids


def load_decoder(args):
    from tidar_jax.decode import Decoder, DecodeError
    from tidar_jax.loading import CheckpointNotFound, checkpoint_kind, load_for_inference

    mesh = None
    if args.mesh is not None:
        from tidar_jax.sharding import make_mesh

        try:
            mesh = make_mesh(**parse_mesh(args.mesh))
        except ValueError as e:
            raise SystemExit(f"--mesh={args.mesh!r}: {e}")
    try:
        from tidar_jax.pretrained import resolve

        checkpoint = resolve(args.checkpoint, log=lambda m: print(m, file=sys.stderr, flush=True))
        hf_kwargs = {}
        if args.add_mask_token:
            if checkpoint_kind(checkpoint) != "hf":
                raise SystemExit(f"--add-mask-token: {args.checkpoint!r} is not a Hugging Face dir; only a stock HF "
                                 "checkpoint lacks a [MASK] token")
            hf_kwargs["add_mask_token"] = True
        bundle = load_for_inference(checkpoint, mesh=mesh, **hf_kwargs)
    except SystemExit:
        raise
    except CheckpointNotFound as e:
        raise SystemExit(str(e))
    except Exception as e:  # a corrupt or unsupported checkpoint: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # library errors can span lines
        raise SystemExit(f"checkpoint {args.checkpoint!r} could not be loaded: {type(e).__name__}: {first}")
    try:
        return Decoder.from_bundle(bundle, max_cache_len=args.max_cache_len, dtype=args.dtype, mesh=mesh)
    except DecodeError as e:
        raise SystemExit(str(e))


def _option_kwargs(args, mode):
    return dict(mode=mode, block_size=args.block_size, beta=args.beta, slot0=args.slot0,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, allow_untrained_block_size=args.allow_untrained_block_size,
                groups=parse_groups(args.groups), head=args.head or "one_pass", cache_dtype=args.cache_dtype,
                cache_attention=args.cache_attention)


def _common(args):
    from tidar_jax.decode.api import _DEFAULT

    eos = _DEFAULT if args.eos_token_id is None else parse_ids(args.eos_token_id, "--eos-token-id")
    stop = list(args.stop or []) + [parse_ids(t, "--stop-ids") for t in args.stop_ids or []]
    return dict(seed=args.seed, eos_token_id=eos, stop=stop or None)


def _fmt_stats(stats) -> str:
    hist = " ".join(f"{k}:{c}" for k, c in stats["accepted_length_hist"].items())
    groups = "" if stats["mode"] == "ar" or stats["groups"] == list(range(1, stats["block_size"] + 1)) else \
        f" groups={','.join(map(str, stats['groups']))}"
    return (f"[{stats['mode']} B={stats['block_size']}{groups}] {stats['new_tokens'][0]} tokens, NFE {stats['nfe']}, "
            f"T/NFE {stats['tokens_per_nfe']:.2f}, {stats['tokens_per_s']:.1f} tok/s, wall {stats['wall_s']:.3f}s "
            f"(compile {stats['compile_s']:.1f}s), accepted-length histogram {hist}")


def stream_text(dec, prompt, args, colour: bool):
    stream = dec.stream(prompt, **_common(args), **_option_kwargs(args, args.mode))
    tokens, shown, n_chunk = [], "", 0
    for chunk in stream:
        new = chunk[0]
        if not new:
            continue
        tokens += new
        if dec.tokenizer is None:
            piece = " ".join(map(str, new)) + " "
        else:
            text = dec.tokenizer.decode(tokens)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                continue
            piece, shown = text[len(shown):] if text.startswith(shown) else text, text
        if colour:
            piece = COLOURS[n_chunk % 2] + piece + RESET
        n_chunk += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    if dec.tokenizer is not None:
        text = dec.tokenizer.decode(tokens)
        if text != shown:
            sys.stdout.write(text[len(shown):] if text.startswith(shown) else text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.result


def _plan_target_and_config(args, what: str):
    """The target's devices and the model shape for ``--plan``/``--recommendation`` (one-line errors)."""
    from tidar_jax.config import ConfigError
    from tidar_jax.targets import parse_target, target_devices

    if args.target is None:
        raise SystemExit(f"{what} needs --target (e.g. h100, h200x8, v5p-8)")
    if (args.preset is None) == (args.hf_config is None):
        raise SystemExit(f"{what} needs exactly one of --preset (qwen2.5-1.5b, qwen3-8b) and --hf-config")
    try:
        target = parse_target(args.target)
        devices = target_devices(target)
        from tidar_jax.analysis.decode_plan import model_config_for_plan

        return target, devices, model_config_for_plan(args.preset, args.hf_config, args.dtype or "bfloat16")
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def run_recommendation(args) -> int:
    """``--recommendation`` without a file: B and groups from the compiled steps' estimates."""
    target, devices, cfg = _plan_target_and_config(args, "--recommendation")  # before jax initialises
    from tidar_jax.analysis import recommend as rec

    for flag, value in (("--batch", args.batch), ("--context", args.context)):
        if value < 1:
            raise SystemExit(f"{flag}={value}: must be an integer >= 1")
    try:
        blocks = tuple(int(b) for b in args.blocks.split(","))
    except ValueError:
        raise SystemExit(f"--blocks={args.blocks!r}: must be comma-separated integers >= 2 (e.g. 4,8,16)") from None
    if not blocks or min(blocks) < 2:
        raise SystemExit(f"--blocks={args.blocks!r}: must be comma-separated integers >= 2 (e.g. 4,8,16)")
    try:
        table = rec.parse_tokens_per_nfe(args.tokens_per_nfe) if args.tokens_per_nfe is not None else None
        if isinstance(table, float):
            raise ValueError(f"--tokens-per-nfe={args.tokens_per_nfe}: with --recommendation give B=T per block "
                             f"(e.g. 4=3.1,8=5.0,16=7.45)")
        accept = rec.acceptance(blocks, args.acceptance, table, args.preset)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = rec.recommend(cfg, devices, target.chip, batch=args.batch, context=args.context, blocks=blocks,
                        accept=accept, max_new_tokens=args.max_new_tokens)
    out["target"] = target.name
    print(json.dumps(out, indent=2) if args.json else rec.format_recommendation(out, target.name))
    return 0


def _tokens_per_nfe_for_estimate(args, block: int) -> float | None:
    from tidar_jax.analysis.recommend import parse_tokens_per_nfe

    if args.tokens_per_nfe is None:
        return None
    try:
        value = parse_tokens_per_nfe(args.tokens_per_nfe)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if isinstance(value, dict):
        if block not in value:
            raise SystemExit(f"--tokens-per-nfe={args.tokens_per_nfe!r}: no entry for --block-size {block}")
        value = value[block]
    if value <= 0:
        raise SystemExit(f"--tokens-per-nfe={args.tokens_per_nfe!r}: must be > 0")
    return value


def _xla_cost_options(args, target) -> dict | None:
    """With ``--estimate`` on a GPU target, the steps record XLA:GPU's own cost model (shown beside ours)."""
    if not args.estimate or target.platform != "gpu":
        return None
    from tidar_jax.analysis.xla_cost import compile_options

    return compile_options()


def run_plan(args) -> int:
    """``--plan``: the target is parsed and the environment set before jax initialises (targets imports no jax)."""
    from tidar_jax.config import ConfigError
    from tidar_jax.targets import parse_target, target_devices

    if args.target is None:
        raise SystemExit("--plan needs --target (e.g. h100, h200x8, v5p-8)")
    if (args.preset is None) == (args.hf_config is None):
        raise SystemExit("--plan needs exactly one of --preset (qwen2.5-1.5b, qwen3-8b) and --hf-config")
    for flag, value, low in (("--batch", args.batch, 1), ("--context", args.context, 1),
                             ("--cache-page", args.cache_page, 1),
                             ("--block-size", args.block_size or DEFAULT_BLOCK_SIZE, 1)):
        if value < low:
            raise SystemExit(f"{flag}={value}: must be an integer >= {low}")
    try:
        target = parse_target(args.target)
        devices = target_devices(target)
        from tidar_jax.analysis.decode_plan import compile_decode, format_plan, model_config_for_plan, plan_summary

        cfg = model_config_for_plan(args.preset, args.hf_config, args.dtype or "bfloat16")
        block = args.block_size or cfg.block_size or DEFAULT_BLOCK_SIZE
        mesh = parse_mesh(args.mesh) if args.mesh else {"data": 1, "fsdp": 1, "tensor": 1}
        shape = (mesh["data"], mesh["fsdp"], mesh["tensor"])
        if shape[0] * shape[1] * shape[2] > len(devices):
            raise SystemExit(f"--mesh={args.mesh!r}: needs {shape[0] * shape[1] * shape[2]} devices; --target "
                             f"{target.name} has {len(devices)}")
        programs = compile_decode(cfg, devices, batch=args.batch, block_size=block, context=args.context,
                                  max_new_tokens=args.max_new_tokens, cache_page=args.cache_page,
                                  head=args.head or "one_pass", mesh_shape=shape, cache_dtype=args.cache_dtype,
                                  cache_attention=args.cache_attention,
                                  step_compiler_options=_xla_cost_options(args, target))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    summary = plan_summary(cfg, programs, target=target.name, batch=args.batch, block_size=block,
                           context=args.context, cache_page=args.cache_page)
    if args.estimate:
        from tidar_jax.analysis.decode_plan import decode_estimates

        summary["estimate"] = decode_estimates(programs, target.chip, args.batch,
                                               _tokens_per_nfe_for_estimate(args, block), args.context)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_plan(summary))
        if args.estimate:
            from tidar_jax.analysis.decode_plan import format_decode_estimates

            print(format_decode_estimates(summary["estimate"]))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.plan:
        return run_plan(args)
    if args.recommendation == COMPILED_RECOMMENDATION:
        return run_recommendation(args)
    if args.checkpoint is None:
        raise SystemExit("--checkpoint is required (unless --plan)")
    if args.mode not in ("tidar", "ar"):
        raise SystemExit(f"--mode={args.mode!r}: must be tidar or ar")
    text, ids = read_prompt(args)
    apply_recommendation(args)
    dec = load_decoder(args)
    from tidar_jax.decode import DecodeError

    try:
        prompt = ids if ids is not None else text
        if isinstance(prompt, str) and dec.tokenizer is None:
            raise SystemExit(f"checkpoint {args.checkpoint!r} has no tokenizer: pass the prompt as --prompt-ids")
        prompt_ids = dec.encode(prompt)[0]
        compare = None
        if args.json or args.compare:
            result = dec.generate(prompt_ids, **_common(args), **_option_kwargs(args, args.mode))
            if args.compare:
                other = "ar" if args.mode == "tidar" else "tidar"
                base = dec.generate(prompt_ids, **_common(args), **_option_kwargs(args, other))
                tidar, ar = (result, base) if args.mode == "tidar" else (base, result)
                compare = {
                    "tidar_tokens_per_s": tidar.stats["tokens_per_s"], "ar_tokens_per_s": ar.stats["tokens_per_s"],
                    "speedup": tidar.stats["tokens_per_s"] / ar.stats["tokens_per_s"],
                    "tidar_tokens_per_nfe": tidar.stats["tokens_per_nfe"], "identical": tidar.tokens == ar.tokens,
                    "ar_stats": ar.stats if args.mode == "tidar" else None,
                    "tidar_stats": tidar.stats if args.mode == "ar" else None}
        else:
            colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
            result = stream_text(dec, prompt_ids, args, colour)
    except DecodeError as e:
        raise SystemExit(str(e))

    if args.json:
        obj = {"prompt": text, "prompt_ids": prompt_ids, "tokens": result.tokens[0],
               "text": result.texts[0] if result.texts else None, "stats": result.stats,
               "options": {k: v for k, v in _option_kwargs(args, args.mode).items()}, "compare": compare,
               "checkpoint": args.checkpoint}
        print(json.dumps(obj))
        return 0
    if args.compare:
        print(result.texts[0] if result.texts else " ".join(map(str, result.tokens[0])))
    print(_fmt_stats(result.stats), file=sys.stderr)
    if compare:
        print(f"AR {compare['ar_tokens_per_s']:.1f} tok/s | TiDAR {compare['tidar_tokens_per_s']:.1f} tok/s | "
              f"speedup {compare['speedup']:.2f}x | T/NFE {compare['tidar_tokens_per_nfe']:.2f} | "
              f"outputs {'identical' if compare['identical'] else 'DIFFER'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
