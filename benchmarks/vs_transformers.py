"""Our AR and TiDAR decode vs Hugging Face transformers ``generate`` (PyTorch, CPU) on the *exported* weights of
the same checkpoint, timed interleaved in one run, plus whether the greedy outputs agree.

    python -m benchmarks.vs_transformers --checkpoint RUN_DIR [--quick] [--out benchmarks/results]

The checkpoint is exported with ``tidar_jax.hf.export_hf`` (float32) into a temporary directory and loaded with
``AutoModelForCausalLM.from_pretrained`` (float32, ``--attn`` sdpa|eager). torch uses as many threads as XLA's CPU
pool (the CPUs this process may run on); both numbers are recorded. Every call generates exactly
``--new-tokens`` tokens per row (no EOS on either side) for the same equal-length prompts.
Writes ``vs_transformers.json``.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks import common as bc
from benchmarks import cli


DEFAULTS = {"batch": 1, "prompt_len": 64, "new_tokens": 64, "rounds": 5, "preset": "m38"}
QUICK = {"batch": 1, "prompt_len": 32, "new_tokens": 32, "rounds": 3, "preset": "small"}
TINY = {"batch": 2, "prompt_len": 8, "new_tokens": 6, "rounds": 1, "preset": "tiny"}  # smoke tests only


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Exact match per row and the length of the common prefix (greedy paths diverge for good after a near-tie)."""
    prefix = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"all_equal": all(a == b for a, b in zip(ours, theirs)), "rows_equal": sum(a == b for a, b in
                                                                                       zip(ours, theirs)),
            "rows": len(ours), "common_prefix": prefix}


def hf_generator(hf_dir: str, attn: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, like our side
    model.generation_config.pad_token_id = 0

    def generate(prompts, new_tokens):
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    return generate, torch.get_num_threads()


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "checkpoint", "preset", "tiny", "quick")
    p.add_argument("--batch", type=int, help="prompts per generate call (equal lengths, no padding)")
    cli.add_shared(p, "prompt_len", "new_tokens")
    p.add_argument("--block-size", type=int, help="TiDAR block size (default: the checkpoint's trained one)")
    cli.add_shared(p, "rounds")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    cli.add_shared(p, "data", "seed", "out")
    args = p.parse_args(argv)
    cli.fill_size_defaults(args, DEFAULTS, quick=QUICK, tiny=TINY)
    # --block-size stays None (the checkpoint's own) unless given
    cli.require_positive(args, ("batch", "prompt_len", "new_tokens", "rounds", "block_size"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bundle, trained = bc.load_model(args.checkpoint, args.preset, args.seed)
    cfg = bundle.config
    block = args.block_size or cfg.block_size
    data_dir = bc.find_data_dir(args.checkpoint, args.data)
    prompts, prompt_source = bc.heldout_prompts(cfg, data_dir, args.batch, args.prompt_len, args.seed)

    from tidar_jax.decode import Decoder
    from tidar_jax.hf import export_hf

    threads = bc.cpu_threads()
    with tempfile.TemporaryDirectory(prefix="tidar-vs-hf-") as tmp:
        hf_dir = export_hf(cfg, bundle.params, os.path.join(tmp, "hf"), dtype="float32",
                           max_position_embeddings=max(4096, args.prompt_len + args.new_tokens + 64))
        hf_generate, torch_threads = hf_generator(hf_dir, args.attn, threads)

    dec = Decoder.from_bundle(bundle)
    ours = dict(max_new_tokens=args.new_tokens, eos_token_id=None)
    tidar_kw = dict(mode="tidar", block_size=block, beta=1.0, slot0="verifier", allow_untrained_block_size=True,
                    **ours)
    cands = {
        "transformers": lambda: hf_generate(prompts, args.new_tokens),
        "ours_ar": lambda: dec.generate(prompts, mode="ar", **ours),
        "ours_tidar": lambda: dec.generate(prompts, **tidar_kw),
    }
    outputs = {name: fn() for name, fn in cands.items()}  # also compiles ours
    times = bc.interleaved(cands, rounds=args.rounds, warmup=1, sync=lambda r: r)
    s = {k: bc.stats(v) for k, v in times.items()}
    tokens = args.batch * args.new_tokens
    speed = {k: {"s_p25": v["p25"], "s_min": v["min"], "s_median": v["median"], "tokens_per_s": tokens / v["p25"]}
             for k, v in s.items()}
    hf_tokens = outputs["transformers"]
    result = {
        "benchmark": "vs_transformers", "machine": bc.machine_info(), "model": bc.model_description(bundle, trained),
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "block_size": block,
                     "xla_cpu_threads": threads, "torch_threads": torch_threads, "prompts": prompt_source},
        "warning": None if trained else bc.RANDOM_MODEL_WARNING,
        "speed": speed,
        "ratios": {"ours_ar_over_transformers": speed["ours_ar"]["tokens_per_s"]
                   / speed["transformers"]["tokens_per_s"],
                   "ours_tidar_over_transformers": speed["ours_tidar"]["tokens_per_s"]
                   / speed["transformers"]["tokens_per_s"],
                   "ours_tidar_over_ours_ar": speed["ours_tidar"]["tokens_per_s"] / speed["ours_ar"]["tokens_per_s"]},
        "tidar_tokens_per_nfe": outputs["ours_tidar"].stats["tokens_per_nfe"],
        "greedy_agreement": {"ours_ar_vs_transformers": agreement(outputs["ours_ar"].tokens, hf_tokens),
                             "ours_tidar_vs_transformers": agreement(outputs["ours_tidar"].tokens, hf_tokens),
                             "ours_tidar_vs_ours_ar": agreement(outputs["ours_tidar"].tokens,
                                                                outputs["ours_ar"].tokens)},
    }
    bc.write_json(os.path.join(args.out, "vs_transformers.json"), result)
    print(report(result), flush=True)
    return result


def report(result) -> str:
    st = result["settings"]
    lines = [f"batch {st['batch']}, prompt {st['prompt_len']}, {st['new_tokens']} new tokens; XLA threads "
             f"{st['xla_cpu_threads']}, torch threads {st['torch_threads']}, attn {st['attn']}"]
    if result["warning"]:
        lines.insert(0, result["warning"])
    for k, v in result["speed"].items():
        lines.append(f"  {k:<13} {v['s_p25'] * 1e3:9.1f} ms  {v['tokens_per_s']:9.1f} tok/s")
    r = result["ratios"]
    lines.append(f"ours AR / transformers = {r['ours_ar_over_transformers']:.2f}x; ours TiDAR (B={st['block_size']}, "
                 f"T/NFE {result['tidar_tokens_per_nfe']:.2f}) / transformers = "
                 f"{r['ours_tidar_over_transformers']:.2f}x;"
                 f" TiDAR / AR = {r['ours_tidar_over_ours_ar']:.2f}x")
    for k, v in result["greedy_agreement"].items():
        lines.append(f"  greedy {k}: {v['rows_equal']}/{v['rows']} rows equal; common prefix {v['common_prefix']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
