"""The end of the README's main job: decode held-out code prompts with a trained run and show what TiDAR buys.

    python -m tidar_jax.demo --run-dir runs/tiny

For each held-out prompt it streams a lossless TiDAR generation (beta=1, slot0=verifier) with every accepted chunk
bracketed (coloured in a terminal), then times AR and TiDAR (lossless and trust-diff) on the same prompts, interleaved,
and prints T/NFE, tokens/s, the speedup over AR and whether lossless TiDAR reproduced AR token for token.
"""

from __future__ import annotations

import os
import statistics
import sys

import numpy as np

from tidar_jax.cli import OneLineArgumentParser

COLOURS = ("\033[38;5;39m", "\033[38;5;208m")
RESET = "\033[0m"


def heldout_prompts(data_dir: str, count: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts from the held-out split: the first ``prompt_tokens`` tokens of distinct held-out documents."""
    from tidar_jax.data import load_manifest
    from tidar_jax.data.shards import TokenStream, document_spans, split_parts

    manifest = load_manifest(data_dir)
    stream = TokenStream(split_parts(data_dir, manifest, "eval"), manifest.get("dtype", "uint16"))
    prompts = [stream.read(int(off), int(off) + prompt_tokens).tolist()
               for off, length in document_spans(data_dir, manifest, "eval") if length >= prompt_tokens][:count]
    if not prompts:  # short documents: fall back to fixed windows
        prompts = [stream.read(i * prompt_tokens, (i + 1) * prompt_tokens).tolist() for i in range(count)
                   if (i + 1) * prompt_tokens <= stream.num_tokens]
    return prompts


def _show_chunks(decoder, chunks: list[list[int]], tty: bool) -> str:
    parts = []
    for i, chunk in enumerate(chunks):
        text = decoder.tokenizer.decode(chunk) if decoder.tokenizer is not None else " ".join(map(str, chunk))
        parts.append(f"{COLOURS[i % 2]}{text}{RESET}" if tty else f"[{text}]")
    return "".join(parts)


def run_demo(run_dir: str, num_prompts: int = 4, prompt_tokens: int = 48, max_new_tokens: int = 64,
             repeats: int = 3, out=sys.stdout) -> dict:
    import yaml

    from tidar_jax.decode import Decoder
    from tidar_jax.loading import load_for_inference

    bundle = load_for_inference(run_dir)
    decoder = Decoder.from_bundle(bundle)
    block = bundle.config.block_size
    if block is None:
        raise ValueError(f"{run_dir}: an AR-only run (it trained no drafter); the demo shows TiDAR decoding")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        data_dir = yaml.safe_load(f)["data"]["dir"]
    prompts = heldout_prompts(data_dir, num_prompts, prompt_tokens)
    tty = out.isatty() if hasattr(out, "isatty") else False

    modes = {
        "ar": dict(mode="ar"),
        "tidar_lossless": dict(mode="tidar", block_size=block, beta=1.0, slot0="verifier"),
        "tidar_trust_diff": dict(mode="tidar", block_size=block, beta=0.0, slot0="diffusion"),
    }
    print(f"\n== TiDAR demo: {run_dir} (block size {block}, {len(prompts)} held-out prompts, "
          f"{max_new_tokens} new tokens each) ==", file=out)
    # 1) show accepted chunks for each prompt (lossless mode), streaming through the same compiled step
    for i, prompt in enumerate(prompts[: min(2, len(prompts))]):
        stream = decoder.stream([prompt], max_new_tokens=max_new_tokens, **modes["tidar_lossless"])
        chunks = [c[0] for c in stream if c[0]]
        prompt_text = decoder.tokenizer.decode(prompt) if decoder.tokenizer else str(prompt)
        print(f"\n--- prompt {i} ---\n{prompt_text}", file=out)
        print(f"--- TiDAR continuation (each {'colour' if tty else '[bracket]'} = one forward pass) ---", file=out)
        print(_show_chunks(decoder, chunks, tty), file=out)

    # 2) interleaved timing: every repeat runs all modes on the same prompt batch
    for opts in modes.values():  # compile (and warm up) outside the timed region
        decoder.generate(prompts, max_new_tokens=max_new_tokens, **opts)
    walls = {name: [] for name in modes}
    results = {}
    for _ in range(repeats):
        for name, opts in modes.items():
            res = decoder.generate(prompts, max_new_tokens=max_new_tokens, **opts)
            walls[name].append(res.stats["wall_s"])
            results[name] = res
    summary = {"run_dir": os.path.abspath(run_dir), "block_size": block, "prompts": len(prompts),
               "max_new_tokens": max_new_tokens, "modes": {}}
    ar_wall = statistics.median(walls["ar"])
    for name, res in results.items():
        wall = statistics.median(walls[name])
        tokens = sum(len(t) for t in res.tokens)
        summary["modes"][name] = {
            "tokens_per_nfe": res.stats["tokens_per_nfe"], "mean_accepted": res.stats["mean_accepted"],
            "accepted_length_hist": res.stats["accepted_length_hist"], "median_wall_s": wall,
            "tokens_per_s": tokens / wall, "speedup_vs_ar": ar_wall / wall,
        }
    summary["lossless_equals_ar"] = results["tidar_lossless"].tokens == results["ar"].tokens
    summary["limits"] = speed_limits(summary, {name: res.stats["nfe"] for name, res in results.items()}, block)
    summary["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print("\n== summary (batch of all prompts, median of interleaved repeats) ==", file=out)
    print(f"{'mode':<18}{'T/NFE':>8}{'tokens/s':>11}{'speedup':>9}  accepted-length histogram", file=out)
    for name, m in summary["modes"].items():
        print(f"{name:<18}{m['tokens_per_nfe']:>8.2f}{m['tokens_per_s']:>11.1f}{m['speedup_vs_ar']:>8.2f}x  "
              f"{m['accepted_length_hist']}", file=out)
    same = "yes" if summary["lossless_equals_ar"] else "NO"
    print(f"lossless TiDAR output identical to AR: {same}", file=out)
    lim = summary["limits"]
    print(f"\nwhat limits the speedup (lossless): a TiDAR step costs {lim['step_cost_in_ar_forwards']:.2f} AR "
          f"(1-token) forwards here, so perfect drafts (all {block} accepted every step) would give "
          f"{lim['perfect_draft_speedup']:.2f}x; the drafts give T/NFE {lim['tokens_per_nfe']:.2f}, i.e. "
          f"{lim['achieved_speedup']:.2f}x achieved. Limited by {lim['limited_by']}.", file=out)
    load = summary["load_average"]
    if load is not None:
        print(f"(timings on this machine at load average {load[0]:.1f}; other processes inflate them)", file=out)
    return summary


def speed_limits(summary: dict, nfe: dict, block: int) -> dict:
    """Which limit binds lossless TiDAR here: the hardware (a step's cost ``c`` in 1-token AR forwards, so perfect
    drafts give B / c) or the drafts (T/NFE, so the speedup achieved is about T/NFE / c).

    Costs per forward are the measured median wall of each mode divided by its forwards (prefill included)."""
    ar, tidar = summary["modes"]["ar"], summary["modes"]["tidar_lossless"]
    cost = (tidar["median_wall_s"] / nfe["tidar_lossless"]) / (ar["median_wall_s"] / nfe["ar"])
    perfect = block / cost
    achieved = tidar["speedup_vs_ar"]
    # the drafts bind when they leave most of the hardware's headroom unused; the hardware binds when even perfect
    # drafts would not make TiDAR much faster than AR
    limited_by = ("the hardware (even perfect drafts would not beat AR)" if perfect < 1.0 else
                  "the drafts" if tidar["tokens_per_nfe"] < 0.5 * block else "both")
    return {"step_cost_in_ar_forwards": cost, "perfect_draft_speedup": perfect, "tokens_per_nfe":
            tidar["tokens_per_nfe"], "achieved_speedup": achieved, "limited_by": limited_by}


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny", help="training run dir (default runs/tiny)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("prompts", "prompt_tokens", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.json:  # checked before the demo runs, not after
        from tidar_jax.output_paths import OutputPathError, check_output_file
        try:
            check_output_file(args.json)
        except OutputPathError as e:
            raise SystemExit(f"error: --json {e}") from None
    if not os.path.isfile(os.path.join(args.run_dir, "config.yaml")):
        raise SystemExit(f"error: --run-dir {args.run_dir!r} is not a training run dir (no config.yaml); "
                         "train first: python train.py --config configs/tiny.yaml --run-dir runs/tiny")
    summary = run_demo(args.run_dir, args.prompts, args.prompt_tokens, args.max_new_tokens, args.repeats)
    if args.json:
        from tidar_jax.checkpoint.atomic import write_json
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
