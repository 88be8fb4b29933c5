"""Run the whole benchmark suite in one command and write ``summary.json`` / ``summary.md`` (+ the PNG plots).

    python -m benchmarks.run_all [--checkpoint RUN_DIR] [--quick] [--out benchmarks/results]

Each benchmark is its own script (run here as a subprocess, so one failing does not stop the others; its output is
kept in ``OUT/logs/<name>.log``) and writes its own JSON into ``--out``; this script collects the headline figures.
Model under test: ``--checkpoint`` if given, else ``runs/tiny`` when that run dir holds a checkpoint (the run
``python train.py --config configs/tiny.yaml --run-dir runs/tiny`` makes), else -- or with ``--random-init`` -- a
random-init model (every script then prints a loud warning: acceptance/speedup numbers are meaningless).
``benchmarks/decode_speed.py`` and ``benchmarks/train_step.py`` always use their own model choice (see their docs).
Exit status: 0 when every benchmark ran, 1 when any failed (the summary still lists what did run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks import ROOT, cli
from benchmarks import common as bc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUN = os.path.join(ROOT, "runs", "tiny")


def default_checkpoint() -> str | None:
    ckpts = os.path.join(DEFAULT_RUN, "checkpoints")
    if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
        return DEFAULT_RUN
    return None


def steps(args) -> list[dict]:
    """name, script, its arguments, and the JSON it writes (relative to --out)."""
    ckpt = ["--checkpoint", _shown(args.checkpoint)] if args.checkpoint else []
    size = ["--tiny"] if args.tiny else ["--quick"] if args.quick else []
    out = _shown(args.out)
    mine = ["--out", out, *ckpt, *size] + (["--preset", args.preset] if args.preset and not args.checkpoint
                                                else [])
    # owned by other engineers: called with their own CLIs (no --quick/--tiny there: sizes spelled out)
    decode_speed = ["--out-dir", out, *ckpt]
    if args.tiny:
        decode_speed += ["--block-sizes", "2", "--batch-sizes", "1", "--rounds", "1", "--max-new-tokens", "6",
                         "--prompt-len", "8", "--vocab", "256", "--hidden", "32", "--layers", "1"]
    elif args.quick:
        decode_speed += ["--block-sizes", "4,8", "--batch-sizes", "1,4", "--rounds", "3", "--max-new-tokens", "32"]
    train_step = ["--out", out]
    if args.tiny:
        train_step += ["--rounds", "1", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
                       "model.num_kv_heads=1", "model.mlp_size=64", "data.seq_len=16", "data.global_batch=2"]
    elif args.quick:
        train_step += ["--rounds", "5"]
    table = [
        {"name": "free_slots", "script": "free_slots.py", "args": mine, "json": "free_slots.json"},
        {"name": "decode_modes", "script": "decode_modes.py", "args": mine, "json": "decode_modes.json"},
        {"name": "bandwidth", "script": "bandwidth.py", "args": mine, "json": "bandwidth.json"},
        {"name": "vs_transformers", "script": "vs_transformers.py", "args": mine, "json": "vs_transformers.json"},
        {"name": "decode_speed", "script": "decode_speed.py", "args": decode_speed, "json": "decode_speed.json"},
        {"name": "train_step", "script": "train_step.py", "args": train_step, "json": "train_step.json"},
    ]
    return [s for s in table if s["name"] in args.only] if args.only else table


def _shown(path: str) -> str:
    """A path as commands show it: relative to the repository (where the scripts run) when inside it."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def run_step(step: dict, out: str) -> dict:
    script = os.path.join(HERE, step["script"])
    if not os.path.isfile(script):
        return {"status": "missing", "error": f"{step['script']} is not in this checkout"}
    # as a module of the package from the root, so it imports this checkout whatever is installed
    cmd = [sys.executable, "-m", "benchmarks." + os.path.splitext(step["script"])[0], *step["args"]]
    log_path = os.path.join(out, "logs", f"{step['name']}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    shown = " ".join(["python", "-m", cmd[2], *step["args"]])
    print(f"\n=== {step['name']}: {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    status = {"status": "ok" if rc == 0 else "failed", "exit_code": rc, "wall_s": time.perf_counter() - t0,
              "command": shown,
              "log": os.path.relpath(log_path, out)}
    path = os.path.join(out, step["json"])
    if rc == 0 and os.path.isfile(path):
        with open(path) as f:
            status["result"] = json.load(f)
    elif rc == 0:
        status["status"] = "no-result"
        status["error"] = f"{step['json']} was not written"
    return status


def existing_result(step: dict, out: str) -> dict:
    """``--summarize-only``: the JSON a previous run of this benchmark left in ``out`` (its own command line is not
    known, so the summary names the script only)."""
    path = os.path.join(out, step["json"])
    if not os.path.isfile(path):
        return {"status": "missing", "error": f"{step['json']} is not in {out}"}
    with open(path) as f:
        return {"status": "ok", "command": f"(existing {step['json']}, written by benchmarks/{step['script']})",
                "result": json.load(f)}


# ------------------------------------------------------------------------------------------------------------
# Headline figures per benchmark (each tolerant of what the result holds)
# ------------------------------------------------------------------------------------------------------------

def headline_free_slots(r) -> dict:
    rec = r["recommendation"]
    return {"free_slots": r["free_slots"], "best_block_size": rec["best_block_size"],
            "per_context": {c: {"ar_tokens_per_s": v["ar_tokens_per_s"], "best_block_size": v["best_block_size"],
                                "blocks": [{k: b[k] for k in ("block_size", "step_vs_ar_latency", "mean_accepted",
                                                              "expected_speedup_vs_ar")} for b in v["blocks"]]}
                            for c, v in rec["per_context"].items()}}


def headline_bandwidth(r) -> dict:
    return {"copy_gb_s": r["bandwidth"]["copy_gb_s"], "read_gb_s": r["bandwidth"]["read_gb_s"], "note": r.get("note"),
            "ar_step": [{k: s[k] for k in ("context", "step_ms_p25", "bound_ms_copy_bw", "step_over_bound_copy")}
                        for s in r["ar_step"]]}


def headline_vs_transformers(r) -> dict:
    return {"ratios": r["ratios"], "tidar_tokens_per_nfe": r["tidar_tokens_per_nfe"],
            "tokens_per_s": {k: v["tokens_per_s"] for k, v in r["speed"].items()},
            "greedy_equal": {k: v["all_equal"] for k, v in r["greedy_agreement"].items()},
            "threads": {"xla": r["settings"]["xla_cpu_threads"], "torch": r["settings"]["torch_threads"]}}


def headline_decode_modes(r) -> dict:
    keys = ("mode", "block_size", "batch", "tokens_per_s", "tokens_per_nfe", "speedup_vs_ar", "speedup_over_tnfe",
            "forward_cost_vs_ar", "equal_to_ar")
    return {"rows": [{k: row[k] for k in keys} for row in r["rows"]]}


def headline_decode_speed(r) -> dict:
    keys = ("config", "tokens_per_s", "tokens_per_nfe", "speedup_vs_ar", "speedup_over_tnfe",
            "head_saving_step_ratio")
    return {"model": r.get("model"), "rows": [{k: row.get(k) for k in keys} for row in r["results"]
                                              if not row.get("full_head")]}


def headline_train_step(r) -> dict:
    return {"ratio_tidar_over_ar": r["ratio_tidar_over_ar"], "tidar_step_ms": r["tidar"]["median_s"] * 1e3,
            "ar_step_ms": r["ar"]["median_s"] * 1e3, "batch": r["batch"], "seq_len": r["seq_len"],
            "model_params_M": r["model"]["params_M"]}


HEADLINES = {"free_slots": headline_free_slots, "bandwidth": headline_bandwidth,
             "vs_transformers": headline_vs_transformers, "decode_modes": headline_decode_modes,
             "decode_speed": headline_decode_speed, "train_step": headline_train_step}


def summarize(results: dict) -> dict:
    out = {}
    for name, st in results.items():
        entry = {k: v for k, v in st.items() if k != "result"}
        machine = st.get("result", {}).get("machine") if isinstance(st.get("result"), dict) else None
        if isinstance(machine, dict):
            entry["load_average"] = machine.get("load_average_1_5_15")
        if "result" in st:
            fn = HEADLINES.get(name)
            try:
                entry["headline"] = fn(st["result"]) if fn else _generic_headline(st["result"])
            except (KeyError, TypeError, ValueError) as e:
                entry["headline_error"] = f"{type(e).__name__}: {e}"
        out[name] = entry
    return out


def _generic_headline(r):
    """For scripts owned elsewhere: keep the top-level scalars and small tables as they are."""
    if not isinstance(r, dict):
        return r
    return {k: v for k, v in r.items() if k not in ("machine",) and len(json.dumps(v, default=str)) < 4000}


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = ["# Benchmark summary", "",
             f"Command: `{summary['command']}`", "",
             f"- Machine: {m['cpu_model']}, {m['cpu_threads']} CPUs, {m['memory_gib']} GiB; jax {m['versions']['jax']} "
             f"on {m['jax_backend']} ({m['device_kind']}); load average at start {summary['load_average_start']}, "
             f"at end {summary['load_average_end']}.",
             f"- Model: {summary['model']}" + ("" if summary["trained"] else " -- **RANDOM INIT: acceptance, T/NFE and "
                                                                            "speedups are not meaningful**"),
             ""]
    b = summary["benchmarks"]
    fs = b.get("free_slots", {}).get("headline")
    if fs:
        lines += ["## Free token slots (forward latency vs query tokens, batch 1)", "",
                  "| context L | max Q within 1.1x of Q=1 | within 1.5x | within 2x | best B | AR tok/s |",
                  "|---|---|---|---|---|---|"]
        for c, v in fs["free_slots"].items():
            pc = fs["per_context"][c]
            lines.append(f"| {c} | {v['max_q_within_1.1x']} | {v['max_q_within_1.5x']} | {v['max_q_within_2.0x']} | "
                         f"{pc['best_block_size']} | {pc['ar_tokens_per_s']:.1f} |")
        lines += ["", "| context L | B | step latency / AR step | E[accepted] | expected speedup |",
                  "|---|---|---|---|---|"]
        for c, pc in fs["per_context"].items():
            for blk in pc["blocks"]:
                lines.append(f"| {c} | {blk['block_size']} | {blk['step_vs_ar_latency']:.2f}x | "
                             f"{blk['mean_accepted']:.2f} | {blk['expected_speedup_vs_ar']:.2f}x |")
        lines += ["", f"Recommended draft block size: **B = {fs['best_block_size']}**. Plot: `free_slots.png`.", ""]
    dm = b.get("decode_modes", {}).get("headline")
    if dm:
        lines += ["## TiDAR vs our own AR decode (greedy, interleaved)", "",
                  "| mode | B | batch | tokens/s | T/NFE | speedup vs AR | speedup / T/NFE | forward cost vs AR | "
                  "output == AR |", "|---|---|---|---|---|---|---|---|---|"]
        for r in dm["rows"]:
            lines.append(f"| {r['mode']} | {r['block_size']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_nfe']:.2f} | {r['speedup_vs_ar']:.2f}x | {r['speedup_over_tnfe']:.2f} | "
                         f"{r['forward_cost_vs_ar']:.2f}x | {'yes' if r['equal_to_ar'] else 'no'} |")
        lines += ["", "Plots: `speedup_vs_block.png`, `accepted_hist.png`.", ""]
    ds = b.get("decode_speed", {}).get("headline")
    if ds:
        lines += ["## Selective LM head (benchmarks/decode_speed.py)", "", f"Model: {ds['model']}", "",
                  "| config | tokens/s | T/NFE | speedup vs AR | full-head / selective step time |",
                  "|---|---|---|---|---|"]
        for r in ds["rows"]:
            saving = f"{r['head_saving_step_ratio']:.2f}x" if r.get("head_saving_step_ratio") else "-"
            lines.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_nfe']:.2f} | "
                         f"{r['speedup_vs_ar']:.2f}x | {saving} |")
        lines.append("")
    ts = b.get("train_step", {}).get("headline")
    if ts:
        lines += ["## Train step: TiDAR objective vs AR objective (benchmarks/train_step.py)", "",
                  f"{ts['model_params_M']:.2f}M-param model, batch {ts['batch']} x S={ts['seq_len']}: TiDAR step "
                  f"{ts['tidar_step_ms']:.1f} ms, AR step {ts['ar_step_ms']:.1f} ms -> "
                  f"**{ts['ratio_tidar_over_ar']:.2f}x**.",
                  ""]
    bw = b.get("bandwidth", {}).get("headline")
    if bw:
        lines += ["## AR decode step vs the memory-bandwidth bound", "",
                  f"Copy bandwidth {bw['copy_gb_s']:.1f} GB/s (read+write), read bandwidth {bw['read_gb_s']:.1f} GB/s.",
                  "", "| context L | AR step ms (p25) | bound ms (weights+KV / copy bw) | step / bound |",
                  "|---|---|---|---|"]
        for s in bw["ar_step"]:
            lines.append(f"| {s['context']} | {s['step_ms_p25']:.3f} | {s['bound_ms_copy_bw']:.3f} | "
                         f"{s['step_over_bound_copy']:.2f}x |")
        lines.append("")
        if bw.get("note"):
            lines += [f"Note: {bw['note']}.", ""]
    vt = b.get("vs_transformers", {}).get("headline")
    if vt:
        r = vt["ratios"]
        lines += ["## vs Hugging Face transformers generate (PyTorch CPU, exported weights)", "",
                  "| decoder | tokens/s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in vt["tokens_per_s"].items()]
        lines += ["", f"Ours AR / transformers **{r['ours_ar_over_transformers']:.2f}x**; ours TiDAR / transformers "
                      f"**{r['ours_tidar_over_transformers']:.2f}x** (T/NFE {vt['tidar_tokens_per_nfe']:.2f}); "
                      f"threads XLA {vt['threads']['xla']}, torch {vt['threads']['torch']}. Greedy outputs equal: "
                      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in vt["greedy_equal"].items()) + ".", ""]
    lines += ["## Status", "", "| benchmark | status | wall s | load average when it finished | command |",
              "|---|---|---|---|---|"]
    for name, st in b.items():
        wall = f"{st['wall_s']:.0f}" if "wall_s" in st else "-"
        load = st.get("load_average") or "-"
        lines.append(f"| {name} | {st['status']} | {wall} | {load} | `{st.get('command', st.get('error', ''))}` |")
    pngs = summary.get("plots", [])
    if pngs:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in pngs)]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = cli.parser(__doc__)
    cli.add_shared(p, "checkpoint", checkpoint=dict(help="run dir / params checkpoint / HF dir (default: runs/tiny "
                                                         "if trained)"))
    p.add_argument("--random-init", action="store_true", help="use a random-init model even if runs/tiny exists")
    cli.add_shared(p, "preset", "quick", "tiny", preset=dict(help="random model when there is no checkpoint"),
                   quick=dict(help="every benchmark at its quick size"),
                   tiny=dict(help="every benchmark at its smallest size (smoke tests)"))
    p.add_argument("--only", help="comma-separated subset: free_slots,decode_modes,bandwidth,vs_transformers,"
                                  "decode_speed,train_step")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing: rebuild summary.{json,md} and the plots from the JSON files already in --out")
    cli.add_shared(p, "out")
    args = p.parse_args(argv)
    known = {"free_slots", "decode_modes", "bandwidth", "vs_transformers", "decode_speed", "train_step"}
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.only is not None and (not args.only or set(args.only) - known):
        cli.fail(f"--only={','.join(args.only)}: must be a comma-separated subset of {','.join(sorted(known))}")
    if args.random_init and args.checkpoint:
        cli.fail("--random-init and --checkpoint: give one or the other")
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        cli.fail(f"--checkpoint {args.checkpoint}: does not exist")
    if args.checkpoint is None and not args.random_init:
        args.checkpoint = default_checkpoint()
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.checkpoint is None:
        print(bc.RANDOM_MODEL_WARNING, flush=True)
    load_start = bc.load_average()
    if args.summarize_only:
        if not os.path.isdir(args.out):
            cli.fail(f"--out {args.out}: no such directory (--summarize-only reads the results already there)")
        results = {s["name"]: existing_result(s, args.out) for s in steps(args)}
    else:
        os.makedirs(args.out, exist_ok=True)
        results = {s["name"]: run_step(s, args.out) for s in steps(args)}
    machine = bc.machine_info()
    model_info = next((st["result"]["model"] for st in results.values()
                       if isinstance(st.get("result"), dict) and isinstance(st["result"].get("model"), dict)
                       and "source" in st["result"]["model"]), {})
    plots = sorted(f for f in os.listdir(args.out) if f.endswith(".png"))
    extra = make_plots(results, args.out)
    summary = {"command": command.strip(), "machine": machine, "load_average_start": load_start,
               "load_average_end": bc.load_average(), "checkpoint": args.checkpoint,
               "model": model_info.get("source", args.checkpoint or "random-init"),
               "trained": bool(model_info.get("trained", args.checkpoint is not None)),
               "benchmarks": summarize(results), "plots": sorted(set(plots) | set(extra))}
    bc.write_json(os.path.join(args.out, "summary.json"), summary)
    bc.write_text(os.path.join(args.out, "summary.md"), markdown(summary))
    print(f"\nwrote {os.path.join(args.out, 'summary.md')} and summary.json")
    failed = [n for n, st in results.items() if st["status"] != "ok"]
    if failed:
        print(f"benchmarks not completed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def make_plots(results: dict, out: str) -> list[str]:
    """Plots built from the results: measured speedup vs block size and the accepted-length histogram (from
    decode_modes), or the free-slot profiler's expected figures when decode_modes did not run."""
    from benchmarks import plots

    made = []
    dm = results.get("decode_modes", {}).get("result")
    fs = results.get("free_slots", {}).get("result")
    if dm:
        tidar = [r for r in dm["rows"] if r["mode"] != "ar"]
        points = [{"label": f"{r['mode']} N={r['batch']}", "block_size": r["block_size"],
                   "speedup": r["speedup_vs_ar"], "tokens_per_nfe": r["tokens_per_nfe"]} for r in tidar]
        hists = {f"{r['mode']} B={r['block_size']}": r["accepted_length_hist"] for r in tidar
                 if r["batch"] == min(x["batch"] for x in tidar)}
        title = "measured TiDAR speedup over AR decode"
    elif fs:
        points = [{"label": f"expected, L={c}", "block_size": blk["block_size"],
                   "speedup": blk["expected_speedup_vs_ar"],
                   "tokens_per_nfe": fs["acceptance"]["per_block"][str(blk["block_size"])]["tokens_per_nfe"]}
                  for c, v in fs["recommendation"]["per_context"].items() for blk in v["blocks"]]
        hists = {f"B={b}": v["accepted_length_hist"] for b, v in fs["acceptance"]["per_block"].items()}
        title = "expected TiDAR speedup over AR (free-slot profiler)"
    else:
        return made
    made.append(os.path.basename(plots.speedup_vs_block(points, os.path.join(out, "speedup_vs_block.png"), title)))
    made.append(os.path.basename(plots.accepted_histogram(hists, os.path.join(out, "accepted_hist.png"))))
    return made


if __name__ == "__main__":
    sys.exit(main())
