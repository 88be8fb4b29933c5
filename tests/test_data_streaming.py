"""Streaming preparation: compressed / Parquet inputs, worker-count invariance, --shard + merge == unsharded,
kill -9 then re-run == uninterrupted, bad inputs (one line naming the file, nothing written); weighted mixtures."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tidar_jax.data import DataError, load_manifest, load_tokenizer, make_train_iterator, prepare_corpus
from tidar_jax.data import prepare as prepare_cli
from tidar_jax.data.merge import merge_parts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300


def _text(i):
    return "".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i % 7}\n" for j in range(3 + i % 11))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Mixed input kinds: plain, .txt.gz, .jsonl.gz (field 'body'), .jsonl.zst, Parquet (column 'body')."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("mixed")
    (root / "plain").mkdir()
    for i in range(30):
        (root / "plain" / f"m{i:02d}.py").write_text(_text(i))
    with gzip.open(root / "notes.txt.gz", "wt") as f:
        f.write("compressed plain text document\n" * 3)
    with gzip.open(root / "recs.jsonl.gz", "wt") as f:
        for i in range(40):
            f.write(json.dumps({"body": _text(100 + i), "id": i}) + "\n")
    with open(root / "recs.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"body": _text(200 + i)}) + "\n" for i in range(25)).encode()))
    table = pa.table({"body": [_text(300 + i) for i in range(50)] + [None, "  "], "n": list(range(52))})
    pq.write_table(table, root / "rows.parquet", row_group_size=8)
    return root


def _expected(root):
    docs = {f"plain/m{i:02d}.py": _text(i) for i in range(30)}
    docs["notes.txt.gz"] = "compressed plain text document\n" * 3
    docs.update({f"recs.jsonl.gz#{i + 1}": _text(100 + i) for i in range(40)})
    docs.update({f"recs.jsonl.zst#{i + 1}": _text(200 + i) for i in range(25)})
    docs.update({f"rows.parquet#{i + 1}": _text(300 + i) for i in range(50)})
    return docs


def _rows(d):
    with open(os.path.join(d, "documents.jsonl")) as f:
        return [json.loads(line) for line in f]


def _stream(d, split):
    m = load_manifest(d)
    return np.concatenate([np.fromfile(os.path.join(d, s["file"]), dtype=m["dtype"]) for s in
                           m["splits"][split]["shards"]])


def _files(d):
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


def test_input_kinds_round_trip_and_workers_do_not_change_anything(corpus, tmp_path):
    kw = dict(sources=[str(corpus)], vocab_size=VOCAB, heldout_fraction=0.2, text_field="body",
              shard_tokens=700)
    m1 = prepare_corpus(tmp_path / "w1", workers=1, **kw)
    m4 = prepare_corpus(tmp_path / "w4", workers=4, **kw)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w4")  # token files, indexes, manifest, tokenizer
    assert m1 == m4 and len(m1["splits"]["train"]["shards"]) > 3
    expected = _expected(corpus)
    rows = _rows(tmp_path / "w1")
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert {s["path"].split("/")[-1]: s["reason"] for s in m1["skipped"]} == {
        "rows.parquet#51": "null 'body'", "rows.parquet#52": "empty text"}
    tok = load_tokenizer(tmp_path / "w1")
    for split in ("train", "eval"):
        ids = _stream(tmp_path / "w1", split)
        for r in (r for r in rows if r["split"] == split):
            piece = ids[r["offset"]:r["offset"] + r["tokens"]].tolist()
            assert tok.decode(piece, skip_special_tokens=False) == expected[r["key"]]
            assert ids[r["offset"] + r["tokens"]] == m1["eos_token_id"]


def test_shards_merged_equal_the_unsharded_preparation(corpus, tmp_path):
    whole = prepare_corpus(tmp_path / "whole", sources=[str(corpus)], vocab_size=VOCAB, heldout_fraction=0.2,
                           text_field="body", shard_tokens=900, workers=1)
    tok = str(tmp_path / "whole" / "tokenizer.json")
    ref = prepare_corpus(tmp_path / "ref", sources=[str(corpus)], tokenizer=tok, heldout_fraction=0.2,
                         text_field="body", shard_tokens=900, workers=1)
    parts = [str(tmp_path / f"part{i}") for i in range(3)]
    for i, p in enumerate(parts):
        prepare_corpus(p, sources=[str(corpus)], tokenizer=tok, heldout_fraction=0.2, text_field="body",
                       shard_tokens=900, workers=1, shard=f"{i}/3")
    merged = merge_parts(tmp_path / "merged", parts[::-1])  # order of the arguments does not matter
    for split in ("train", "eval"):
        assert np.array_equal(_stream(tmp_path / "merged", split), _stream(tmp_path / "ref", split))
        for k in ("documents", "files", "bytes", "tokens"):
            assert merged["splits"][split][k] == ref["splits"][split][k]
    assert _rows(tmp_path / "merged") == _rows(tmp_path / "ref")
    assert merged["skipped"] == ref["skipped"] and merged["files"] == ref["files"]
    assert whole["splits"]["train"]["tokens"] == ref["splits"]["train"]["tokens"]
    a = make_train_iterator(tmp_path / "merged", seq_len=32, global_batch=4, seed=1, packing="documents",
                            block_size=4)
    b = make_train_iterator(tmp_path / "ref", seq_len=32, global_batch=4, seed=1, packing="documents", block_size=4)
    for _ in range(5):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(DataError, match="needs a given tokenizer"):
        prepare_corpus(tmp_path / "nope", sources=[str(corpus)], shard="0/2")
    with pytest.raises(DataError, match="shard='3/2'"):
        prepare_corpus(tmp_path / "nope", sources=[str(corpus)], tokenizer=tok, shard="3/2")


_KILLABLE = """
import sys
import tidar_jax.data.corpus as c
c.JOURNAL_EVERY_S = 0.0  # journal after every chunk
c.CHUNK_DOCUMENTS = 4
from tidar_jax.data.prepare import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_rerun_equals_an_uninterrupted_preparation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(800):
        (src / f"f{i:04d}.py").write_text(_text(i) * 2)
    args = ["--source", str(src), "--vocab-size", str(VOCAB), "--heldout-fraction", "0.1", "--workers", "1",
            "--shard-tokens", "5000"]
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), "--out", str(out)] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / ".out.partial" / "journal.json"
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and proc.poll() is None, "the preparation ended before it could be killed"
        try:
            if json.loads(journal.read_text())["items_done"] >= 100:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing that looks complete
    # What a kill inside a journal write leaves (the temp file of the atomic write), made certain here
    (journal.parent / ".journal.json.k1ll3d").write_text('{"items_done": ')
    rerun = subprocess.run([sys.executable, str(script), "--out", str(out)] + args, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the interrupted preparation" in rerun.stderr
    reference = tmp_path / "ref"
    prepare_corpus(reference, sources=[str(src)], vocab_size=VOCAB, heldout_fraction=0.1, workers=1,
                   shard_tokens=5000)
    assert _files(out) == _files(reference)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref", "run.py", "src"]


def _one_line_error(tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        prepare_cli.main(["--out", str(tmp_path / "o"), "--vocab-size", str(VOCAB)] + argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()  # nothing half-written
    return message


def test_bad_inputs_give_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.txt"
    good.write_text("fine text\n" * 20)
    no_field = tmp_path / "no_field.jsonl.gz"
    with gzip.open(no_field, "wt") as f:
        f.write("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    msg = _one_line_error(tmp_path, ["--source", str(good), "--source", str(no_field)])
    assert str(no_field) in msg and "has a string field 'text'" in msg and "--text-field" in msg

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a b c"] * 10}), table)
    msg = _one_line_error(tmp_path, ["--source", str(table)])
    assert str(table) in msg and "no column 'text'" in msg and "content" in msg

    corrupt = tmp_path / "bad.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200)))
    corrupt.write_bytes(data[:len(data) // 2])
    msg = _one_line_error(tmp_path, ["--source", str(good), "--source", str(corrupt)])
    assert str(corrupt) in msg and "corrupt gzip data" in msg

    bad_zst = tmp_path / "bad.txt.zst"
    bad_zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame" * 4)
    msg = _one_line_error(tmp_path, ["--source", str(bad_zst)])
    assert str(bad_zst) in msg and "corrupt zstd data" in msg

    truncated = tmp_path / "trunc.parquet"
    pq.write_table(pa.table({"text": ["x y z " * 30] * 100}), truncated, row_group_size=10)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    msg = _one_line_error(tmp_path, ["--source", str(truncated)])
    assert str(truncated) in msg and "truncated" in msg

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    msg = _one_line_error(tmp_path, ["--source", str(good), "--source", str(empty)])
    assert str(empty) in msg and "holds no readable files" in msg

    msg = _one_line_error(tmp_path, ["--source", str(good), "--workers", "0"])
    assert "workers=0" in msg


# ----------------------------------------------------------------------------------------------------------------
# Weighted mixtures
# ----------------------------------------------------------------------------------------------------------------

def _window_dir(path, n_tokens, base, fingerprint):
    os.makedirs(path)
    (np.arange(n_tokens, dtype=np.uint16) + base).tofile(os.path.join(path, "train.bin"))
    np.arange(8, dtype=np.uint16).tofile(os.path.join(path, "eval.bin"))
    manifest = {"format_version": 1, "fingerprint": fingerprint, "dtype": "uint16",
                "splits": {"train": {"file": "train.bin", "tokens": n_tokens},
                           "eval": {"file": "eval.bin", "tokens": 8}}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(path)


def test_mixture_proportions_and_exact_mid_epoch_resume(tmp_path):
    s = 4
    a = _window_dir(tmp_path / "a", 31 * s, 0, "a" * 64)  # 31 windows, ids < 10000
    b = _window_dir(tmp_path / "b", 13 * s, 10000, "b" * 64)  # 13 windows, ids >= 10000
    mix = [(a, 3.0), (b, 1.0)]
    it = make_train_iterator(mix, seq_len=s, global_batch=40, seed=0, prefetch=0)
    rows = np.concatenate([next(it)["tokens"] for _ in range(40)])  # 1600 draws
    from_b = rows[:, 0] >= 10000
    # binomial(1600, 0.25): sd ~ 17.3; the draw must be within 4 sd of 400
    assert abs(int(from_b.sum()) - 400) < 4 * np.sqrt(1600 * 0.25 * 0.75)
    for src_rows, n in ((rows[~from_b], 31), (rows[from_b], 13)):
        firsts = src_rows[:, 0].tolist()
        assert sorted(firsts[:n]) == sorted(set(firsts[:n])) and len(set(firsts[:n])) == n  # epoch = each once
        assert np.all(src_rows % s == np.arange(s) % s)  # whole windows
    # mid-epoch resume (also across the process split)
    for kw in ({"prefetch": 0}, {"process_index": 1, "process_count": 2}):
        ref = make_train_iterator(mix, seq_len=s, global_batch=8, seed=0, **kw)
        want = [next(ref)["tokens"] for _ in range(12)]
        it = make_train_iterator(mix, seq_len=s, global_batch=8, seed=0, **kw)
        for _ in range(7):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = make_train_iterator(mix, seq_len=s, global_batch=8, seed=0, **kw)
        resumed.set_state(state)
        assert all(np.array_equal(w, next(resumed)["tokens"]) for w in want[7:])
    other = make_train_iterator([(a, 1.0), (b, 1.0)], seq_len=s, global_batch=8, seed=0)
    with pytest.raises(DataError, match="mixture"):
        other.set_state(state)
    with pytest.raises(DataError, match="weight=0"):
        make_train_iterator([(a, 1.0), (b, 0)], seq_len=s, global_batch=8, seed=0)


@pytest.mark.slow
def test_peak_rss_of_a_1gb_preparation_stays_bounded(tmp_path):
    """1 GB of generated JSONL, 2 workers: the summed RSS of the preparation's processes stays under 1.5 GB.
    (The same code as ``benchmarks/prepare.py --mb 1024``, which reports the figure.)"""
    from benchmarks import prepare as bench

    tok_dir = tmp_path / "tok"
    prepare_corpus(tok_dir, max_files=100, vocab_size=1024)
    bench.generate_corpus(str(tmp_path / "corpus"), 1024)
    result = bench.run_prepare(str(tmp_path / "corpus"), str(tok_dir / "tokenizer.json"), str(tmp_path / "out"), 2)
    assert result["bytes"] >= 1_000_000_000
    assert result["peak_rss_mb"] < 1500
