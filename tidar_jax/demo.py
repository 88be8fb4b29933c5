"""The end of the README's main job: decode held-out code prompts with a trained run and show what TiDAR buys.

    python -m tidar_jax.demo --run-dir runs/tiny

It streams lossless TiDAR generations (beta=1, slot0=verifier: the output is the AR model's) of two held-out
prompts with every accepted chunk bracketed (coloured in a terminal). Then it times AR and lossless TiDAR on the
held-out prompts, interleaved, at batch 1 (the paper's setting, the headline) and at batch 4 (plus trust-diff),
and prints T/NFE, tokens/s, the speedup over AR, whether lossless TiDAR reproduced AR token for token, how often
each draft slot matched the verifier, which limit binds on this machine (a TiDAR step's measured cost in AR
steps), and, from the GPU cost model's results file when it exists, the speedup this T/NFE would give on that GPU,
labelled as an estimate.
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


# the recorded TiDAR/AR step-cost estimates (written by ``python -m benchmarks.gpu_model``), shipped with the package
GPU_ESTIMATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis", "decode_step_ratios.json")


def _batches(prompts, size):
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def _timed(decoder, prompts, batch: int, modes: dict, max_new_tokens: int, repeats: int):
    """Every mode on the prompts in batches of ``batch``, interleaved (each repeat runs all modes on each batch);
    per mode: the outputs, forwards (NFE per row, summed), and the summed median wall of the batches."""
    groups = _batches(prompts, batch)
    for opts in modes.values():  # compile (and warm up) outside the timed region; a last short batch compiles too
        for g in {len(g): g for g in groups}.values():
            decoder.generate(g, max_new_tokens=max_new_tokens, eos_token_id=None, **opts)
    walls = {name: [[] for _ in groups] for name in modes}
    results = {name: [None] * len(groups) for name in modes}
    for _ in range(repeats):
        for gi, g in enumerate(groups):
            for name, opts in modes.items():
                res = decoder.generate(g, max_new_tokens=max_new_tokens, eos_token_id=None, **opts)
                walls[name][gi].append(res.stats["wall_s"])
                results[name][gi] = res
    out = {}
    for name in modes:
        tokens = [t for r in results[name] for t in r.tokens]
        new = sum(len(t) for t in tokens)
        row_nfe = sum(sum(r.stats["nfe_per_row"]) for r in results[name])
        steps = sum(r.stats["nfe"] for r in results[name])  # forwards of the batches (prefill included)
        hist: dict[str, int] = {}
        for r in results[name]:
            for k, v in r.stats["accepted_length_hist"].items():
                hist[k] = hist.get(k, 0) + int(v)
        wall = sum(statistics.median(w) for w in walls[name])
        out[name] = {"tokens": tokens, "tokens_per_nfe": new / max(row_nfe, 1), "forwards": steps,
                     "accepted_length_hist": hist, "wall_s": wall, "tokens_per_s": new / wall}
    ar_wall = out["ar"]["wall_s"]
    for m in out.values():
        m["speedup_vs_ar"] = ar_wall / m["wall_s"]
    return out


def per_position_acceptance(hist: dict, block: int) -> list[float | None]:
    """For draft slot i = 1..B-1: the fraction of steps that reached slot i (drafts 1..i-1 accepted) whose slot-i
    draft equalled the verifier's token. Where this falls off is where the drafts stop being what AR would say."""
    counts = {int(k): int(v) for k, v in hist.items()}
    out = []
    for i in range(1, block):
        reached = sum(v for k, v in counts.items() if k >= i)
        out.append(sum(v for k, v in counts.items() if k >= i + 1) / reached if reached else None)
    return out


def gpu_estimate(tokens_per_nfe: float, block: int, path: str = GPU_ESTIMATE, target: str = "h100",
                 shape: str = "qwen2.5-1.5b", batch: int = 1, context: int = 1024) -> dict:
    """The speedup this T/NFE would give on ``target`` at the ``shape`` model: T/NFE / (TiDAR step / AR step),
    the step ratio being the GPU cost model's estimate of the compiled programs (batch 1, context 1024: the
    paper's setting).

    ``path`` is the recorded table ``benchmarks/gpu_model.py`` writes: JSON with ``assumptions`` and
    flat ``rows`` of ``{target, shape, batch, context, block_size, tidar_over_ar_step}``. An estimate, never a
    measurement; ``{"available": False, "why": ...}`` when the file or the row for this block size is missing."""
    import json

    if not os.path.isfile(path):
        return {"available": False, "why": f"no cost model ({os.path.relpath(path)} is absent)"}
    try:
        with open(path) as f:
            model = json.load(f)
        row = next(r for r in model["rows"] if (r["target"], r["shape"], r["batch"], r["context"],
                                                 r["block_size"]) == (target, shape, batch, context, block))
        ratio = float(row["tidar_over_ar_step"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        return {"available": False, "why": f"{os.path.relpath(path)} has no {target} {shape} batch {batch} "
                                           f"context {context} row for B={block} ({type(e).__name__})"}
    assumptions = model.get("assumptions", [])
    return {"available": True, "target": target, "shape": shape, "batch": batch, "context": context,
            "step_cost_ratio": ratio, "speedup": tokens_per_nfe / ratio,
            "assumptions": [assumptions] if isinstance(assumptions, str) else list(assumptions), "source": path,
            "command": model.get("command")}


def run_demo(run_dir: str, num_prompts: int = 8, prompt_tokens: int = 48, max_new_tokens: int = 64,
             repeats: int = 3, out=sys.stdout, estimate_path: str = GPU_ESTIMATE) -> dict:
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

    lossless = dict(mode="tidar", block_size=block, beta=1.0, slot0="verifier")
    trust = dict(mode="tidar", block_size=block, beta=0.0, slot0="diffusion")
    print(f"\n== TiDAR demo: {run_dir} (block size {block}, {len(prompts)} held-out prompts, "
          f"{max_new_tokens} new tokens each) ==", file=out)
    # 1) show accepted chunks for two prompts (lossless mode), streaming through the same compiled step
    for i, prompt in enumerate(prompts[: min(2, len(prompts))]):
        stream = decoder.stream([prompt], max_new_tokens=max_new_tokens, eos_token_id=None, **lossless)
        chunks = [c[0] for c in stream if c[0]]
        prompt_text = decoder.tokenizer.decode(prompt) if decoder.tokenizer else str(prompt)
        print(f"\n--- prompt {i} ---\n{prompt_text}", file=out)
        print(f"--- TiDAR continuation (each {'colour' if tty else '[bracket]'} = one forward pass) ---", file=out)
        print(_show_chunks(decoder, chunks, tty), file=out)

    # 2) interleaved timing: batch 1 (the paper's setting, the headline), then batch 4
    batch1 = _timed(decoder, prompts, 1, {"ar": dict(mode="ar"), "tidar_lossless": lossless}, max_new_tokens,
                    repeats)
    batch4 = _timed(decoder, prompts, 4, {"ar": dict(mode="ar"), "tidar_lossless": lossless,
                                          "tidar_trust_diff": trust}, max_new_tokens, repeats)
    summary = {"run_dir": os.path.abspath(run_dir), "block_size": block, "prompts": len(prompts),
               "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "batches": {}}
    for name, res in (("1", batch1), ("4", batch4)):
        summary["batches"][name] = {mode: {k: v for k, v in m.items() if k != "tokens"} for mode, m in res.items()}
        summary["batches"][name]["lossless_equals_ar"] = res["tidar_lossless"]["tokens"] == res["ar"]["tokens"]
    head = summary["batches"]["1"]["tidar_lossless"]
    summary["tokens_per_nfe_lossless"] = head["tokens_per_nfe"]
    summary["per_position_acceptance"] = per_position_acceptance(head["accepted_length_hist"], block)
    summary["limits"] = speed_limits(batch1, block)
    summary["gpu_estimate"] = gpu_estimate(head["tokens_per_nfe"], block, estimate_path)
    summary["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print("\n== lossless TiDAR vs AR on this CPU (median of interleaved repeats) ==", file=out)
    print(f"{'batch':<7}{'mode':<18}{'T/NFE':>7}{'tokens/s':>10}{'vs AR':>8}  accepted-length histogram", file=out)
    for name in ("1", "4"):
        for mode, m in summary["batches"][name].items():
            if mode == "lossless_equals_ar":
                continue
            print(f"{name:<7}{mode:<18}{m['tokens_per_nfe']:>7.2f}{m['tokens_per_s']:>10.1f}"
                  f"{m['speedup_vs_ar']:>7.2f}x  {m['accepted_length_hist'] if mode != 'ar' else ''}", file=out)
    same = all(summary["batches"][n]["lossless_equals_ar"] for n in ("1", "4"))
    print(f"lossless TiDAR output identical to AR (batch 1 and 4): {'yes' if same else 'NO'}", file=out)
    print(f"headline (batch 1, lossless, B={block}): T/NFE {head['tokens_per_nfe']:.2f} - every step emits the AR "
          f"model's own tokens, {head['tokens_per_nfe']:.2f} of them per forward on average", file=out)
    acc = ", ".join(f"slot {i + 1}: {a:.0%}" if a is not None else f"slot {i + 1}: -"
                    for i, a in enumerate(summary["per_position_acceptance"]))
    print(f"draft == verifier token, per slot (given the earlier slots were accepted): {acc}", file=out)
    lim = summary["limits"]
    print(f"\nwhat limits the speedup here: a TiDAR step (one {block * (block + 1)}-token forward) costs "
          f"{lim['step_cost_in_ar_forwards']:.2f} AR steps (1-token forwards) on this CPU, measured at batch 1. "
          f"So perfect drafts (all {block} accepted every step) would give {lim['perfect_draft_speedup']:.2f}x and "
          f"these drafts give {lim['achieved_speedup']:.2f}x. Limited by {lim['limited_by']}.", file=out)
    est = summary["gpu_estimate"]
    if est["available"]:
        print(f"ESTIMATE (a cost model, not a measurement): on {est['target']} at the {est['shape']} shape, batch "
              f"{est['batch']}, a B={block} TiDAR step costs {est['step_cost_ratio']:.2f} AR steps, so this T/NFE "
              f"would give about {est['speedup']:.2f}x AR. Assumptions: {'; '.join(est['assumptions']) or 'none given'}"
              f" ({os.path.relpath(est['source'])}).", file=out)
    else:
        print(f"GPU estimate unavailable: {est['why']}.", file=out)
    load = summary["load_average"]
    if load is not None:
        print(f"(timings on this machine at load average {load[0]:.1f}; other processes inflate them)", file=out)
    return summary


def speed_limits(timed: dict, block: int) -> dict:
    """Which limit binds lossless TiDAR here: the hardware (a step's cost ``c`` in 1-token AR forwards, so perfect
    drafts give B / c) or the drafts (T/NFE, so the speedup achieved is about T/NFE / c).

    ``timed``: ``_timed``'s result; a mode's cost per forward is its wall divided by its forwards (prefill
    included)."""
    ar, tidar = timed["ar"], timed["tidar_lossless"]
    cost = (tidar["wall_s"] / tidar["forwards"]) / (ar["wall_s"] / ar["forwards"])
    perfect = block / cost
    # the drafts bind when they leave most of the hardware's headroom unused; the hardware binds when even perfect
    # drafts would not make TiDAR much faster than AR
    limited_by = ("the hardware: even perfect drafts would not beat AR, because XLA:CPU runs the small matmuls of "
                  "a many-token forward far below the cores' peak" if perfect < 1.0 else
                  "the drafts" if tidar["tokens_per_nfe"] < 0.5 * block else "both")
    return {"step_cost_in_ar_forwards": cost, "perfect_draft_speedup": perfect, "tokens_per_nfe":
            tidar["tokens_per_nfe"], "achieved_speedup": tidar["speedup_vs_ar"], "limited_by": limited_by}


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny", help="training run dir (default runs/tiny)")
    parser.add_argument("--prompts", type=int, default=8)
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
