"""Corpus preparation throughput and memory: ``prepare_corpus`` with N workers vs ``tokenizers``' own batch encode.

    python -m benchmarks.prepare                      # 64 MB generated corpus, 2 workers, 2 interleaved rounds
    python -m benchmarks.prepare --mb 1024 --rounds 1 # the 1 GB peak-RSS row (slow: run it once)

The corpus is the stdlib text (the default corpus) repeated with varied names (``def f`` -> ``def v{k}_f``) as JSONL
files of one copy each. One tokenizer (a 4096-token BPE trained on the stdlib) is used by both candidates:
  * ``tokenizers``: ``encode_batch_fast`` over the texts of the first ``--baseline-mb`` MB, in batches of 256
    documents (the library's own multi-threaded rate on these cores; the texts are already in memory);
  * ``prepare``: ``python -m tidar_jax.data.prepare --workers N`` on the whole corpus in a subprocess (reading,
    JSON parsing, the scan pass, encoding, writing shards), with the peak RSS of its process tree (main + workers,
    summed, polled every 50 ms).
Rounds alternate the two; the ratio is taken within this run. Writes ``benchmarks/results/prepare.{json,md}``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import ROOT, cli


def _machine():
    import platform

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"python": platform.python_version(), "cores": len(os.sched_getaffinity(0)), "load_average": load}


def generate_corpus(out_dir: str, megabytes: int) -> tuple[int, int]:
    """Stdlib text repeated with varied names as JSONL (one copy per file); returns (bytes of text, documents)."""
    from tidar_jax.data.sources import read_corpus

    base = read_corpus(None).documents
    os.makedirs(out_dir, exist_ok=True)
    total = docs = k = 0
    while total < megabytes * 1_000_000:
        with open(os.path.join(out_dir, f"copy{k:05d}.jsonl"), "w") as f:
            for d in base:
                text = d.text.replace("def ", f"def v{k}_").replace("class ", f"class V{k}_")
                f.write(json.dumps({"text": text}) + "\n")
                total += len(text.encode("utf-8"))
                docs += 1
                if total >= megabytes * 1_000_000:
                    break
        k += 1
    return total, docs


def baseline_rate(tokenizer_path: str, corpus_dir: str, megabytes: int) -> dict:
    """tokenizers' encode_batch_fast rate (tokens/s, MB/s) on the first ``megabytes`` of the corpus text."""
    from tidar_jax.data.tokenizer import encode_documents, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    texts, size = [], 0
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name)) as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode("utf-8"))
                if size >= megabytes * 1_000_000:
                    break
        if size >= megabytes * 1_000_000:
            break
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 256):
        tokens += sum(len(ids) for ids in encode_documents(tok, texts[i:i + 256]))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": tokens, "bytes": size, "tokens_per_s": tokens / dt, "mb_per_s": size / 1e6 / dt}


def run_prepare(corpus_dir: str, tokenizer_path: str, out_dir: str, workers: int) -> dict:
    """The CLI in a subprocess; wall time and the peak summed RSS of its process tree."""
    import psutil

    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "tidar_jax.data.prepare", "--out", out_dir, "--source", corpus_dir,
           "--tokenizer", tokenizer_path, "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    last_report = t0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if time.perf_counter() - last_report >= 60:  # long runs: the bound is visible before the end
            last_report = time.perf_counter()
            partial = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")
            written = sum(os.path.getsize(os.path.join(partial, n)) for n in os.listdir(partial)
                          if n.endswith(".bin")) if os.path.isdir(partial) else 0
            print(f"  {last_report - t0:.0f} s: peak RSS so far {peak / 1e6:,.0f} MB, {written / 1e6:,.0f} MB of "
                  "tokens written", flush=True)
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"error: prepare failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    from tidar_jax.data import load_manifest

    m = load_manifest(out_dir)
    tokens = sum(m["splits"][s]["tokens"] for s in m["splits"])
    nbytes = sum(m["splits"][s]["bytes"] for s in m["splits"])
    return {"seconds": dt, "tokens": tokens, "bytes": nbytes, "tokens_per_s": tokens / dt,
            "mb_per_s": nbytes / 1e6 / dt, "peak_rss_mb": peak / 1e6, "workers": workers}


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--mb", type=int, default=64, help="generated corpus size in MB (default 64)")
    p.add_argument("--baseline-mb", type=int, default=32, help="text the baseline encodes per round (default 32)")
    p.add_argument("--workers", type=int, default=2)
    cli.add_shared(p, "rounds", rounds=dict(default=2))
    p.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed afterwards)")
    cli.add_shared(p, "out", out=dict(default=os.path.join(ROOT, "benchmarks", "results")))
    p.add_argument("--name", default="prepare", help="result file stem (default prepare)")
    args = p.parse_args(argv)
    cli.require_positive(args, ("mb", "baseline_mb", "workers", "rounds"))
    work = args.work or tempfile.mkdtemp(prefix="tidar-prepare-bench-")
    try:
        from tidar_jax.data import prepare_corpus

        tok_dir = os.path.join(work, "tok")
        if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            prepare_corpus(tok_dir, vocab_size=4096, progress=False)  # the stdlib BPE (default corpus)
        tok = os.path.join(tok_dir, "tokenizer.json")
        corpus = os.path.join(work, f"corpus{args.mb}")
        if not os.path.isdir(corpus):
            size, docs = generate_corpus(corpus, args.mb)
        else:
            size, docs = None, None
        rounds = []
        for r in range(args.rounds):
            base = baseline_rate(tok, corpus, min(args.baseline_mb, args.mb))
            prep = run_prepare(corpus, tok, os.path.join(work, "out"), args.workers)
            rounds.append({"tokenizers": base, "prepare": prep})
            print(f"round {r}: tokenizers {base['tokens_per_s']:,.0f} tok/s ({base['mb_per_s']:.2f} MB/s); "
                  f"prepare --workers {args.workers} {prep['tokens_per_s']:,.0f} tok/s ({prep['mb_per_s']:.2f} MB/s), "
                  f"peak RSS {prep['peak_rss_mb']:,.0f} MB", flush=True)
        best = {k: max(r[k]["tokens_per_s"] for r in rounds) for k in ("tokenizers", "prepare")}
        result = {"machine": _machine(), "corpus_mb": args.mb, "corpus_bytes": size, "documents": docs,
                  "workers": args.workers, "rounds": rounds,
                  "ratio_tokenizers_over_prepare": best["tokenizers"] / best["prepare"],
                  "peak_rss_mb": max(r["prepare"]["peak_rss_mb"] for r in rounds),
                  "command": "python -m benchmarks.prepare " + " ".join(argv if argv is not None else sys.argv[1:])}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        md = [f"# Corpus preparation ({args.mb} MB generated JSONL, {args.workers} workers)", "",
              f"Command: `{result['command']}`; machine {result['machine']}", "",
              "| round | tokenizers tok/s | tokenizers MB/s | prepare tok/s | prepare MB/s | prepare peak RSS MB |",
              "|---|---|---|---|---|---|"]
        for i, r in enumerate(rounds):
            md.append(f"| {i} | {r['tokenizers']['tokens_per_s']:,.0f} | {r['tokenizers']['mb_per_s']:.2f} | "
                      f"{r['prepare']['tokens_per_s']:,.0f} | {r['prepare']['mb_per_s']:.2f} | "
                      f"{r['prepare']['peak_rss_mb']:,.0f} |")
        md += ["", f"Best-round ratio tokenizers / prepare: **{result['ratio_tokenizers_over_prepare']:.2f}x** "
                   f"(goal <= 1.5x); peak RSS **{result['peak_rss_mb']:,.0f} MB** (goal < 1500 MB at 1 GB)."]
        with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        print("\n".join(md[-1:]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
