"""Corpus preparation: counts, skipped-input reporting, exact round trip, held-out split, idempotence, atomicity."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tidar_jax.data import DataError, load_manifest, load_tokenizer, prepare_corpus, token_dtype
from tidar_jax.data import corpus as corpus_mod
from tidar_jax.data import prepare as prepare_cli
from cli_output import user_lines

VOCAB = 300  # tiny BPE: fast to train, still exercises merges

# Plain-text documents of the fixture corpus (relative path -> text). Includes non-ASCII text and the literal eos
# string, which must be encoded as text, not as a document boundary.
TEXT_DOCS = {
    "a.py": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # caf\u00e9 \u4e2d\u6587 \U0001f600\n",
    "b.txt": "The quick brown fox jumps over the lazy dog.\n" * 5,
    "sub/c.md": "# Title\n\nA literal <|endoftext|> and <|mask|> inside a document stay text.\n",
    "sub/deeper/d.rst": "Section\n=======\n\n  indented   spaces\tand tabs\r\nwindows line\r\n",
}
JSONL_RECORDS = [  # (line content, expected outcome)
    (json.dumps({"text": "first jsonl record with\nnewline"}), "doc"),
    ("{not json", "invalid JSON"),
    (json.dumps({"body": "no text field"}), "no string field 'text'"),
    (json.dumps({"text": "   "}), "empty text"),
    (json.dumps({"text": "second record", "meta": 1}), "doc"),
]


def _write_corpus(root):
    for rel, text in TEXT_DOCS.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    with open(os.path.join(root, "recs.jsonl"), "w") as f:
        f.write("\n".join(line for line, _ in JSONL_RECORDS) + "\n\n")
    with open(os.path.join(root, "latin1.txt"), "wb") as f:
        f.write("caf\u00e9 au lait".encode("latin-1"))
    open(os.path.join(root, "empty.txt"), "w").close()
    with open(os.path.join(root, "blank.md"), "w") as f:
        f.write("  \n\t\n")
    with open(os.path.join(root, "blob.bin"), "wb") as f:
        f.write(b"\x00\x01")


def _expected_documents(root):
    """Independent expectation: key -> text of every document that must survive."""
    docs = dict(TEXT_DOCS)
    for lineno, (line, outcome) in enumerate(JSONL_RECORDS, start=1):
        if outcome == "doc":
            docs[f"recs.jsonl#{lineno}"] = json.loads(line)["text"]
    return docs


def _documents_index(data_dir):
    with open(os.path.join(data_dir, "documents.jsonl")) as f:
        return [json.loads(line) for line in f]


def _split_tokens(data_dir, split):
    m = load_manifest(data_dir)
    return np.concatenate([np.fromfile(os.path.join(data_dir, s["file"]), dtype=m["dtype"])
                           for s in m["splits"][split]["shards"]])


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    _write_corpus(root)
    return root


@pytest.fixture(scope="module")
def prepared(corpus_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "data")
    return out, prepare_corpus(out, sources=[corpus_root], vocab_size=VOCAB, heldout_fraction=0.3, seed=0)


def test_manifest_counts_and_skipped_reasons(prepared, corpus_root):
    out, m = prepared
    expected = _expected_documents(corpus_root)
    splits = m["splits"]
    assert splits["train"]["documents"] + splits["eval"]["documents"] == len(expected)
    assert splits["train"]["documents"] >= 1 and splits["eval"]["documents"] >= 1
    reasons = {os.path.relpath(s["path"], corpus_root): s["reason"] for s in m["skipped"]}
    assert reasons["latin1.txt"].startswith("not valid UTF-8 (byte 0xe9 at offset 3)")
    assert reasons["empty.txt"] == "empty file"
    assert reasons["blank.md"] == "empty (whitespace only)"
    for lineno, (_, outcome) in enumerate(JSONL_RECORDS, start=1):
        if outcome != "doc":
            assert outcome in reasons[f"recs.jsonl:{lineno}"]
    assert len(m["skipped"]) == 3 + sum(o != "doc" for _, o in JSONL_RECORDS)
    assert m["ignored_extensions"] == {".bin": 1}
    assert m["files"]["with_documents"] == len(TEXT_DOCS) + 1
    itemsize = np.dtype(m["dtype"]).itemsize
    for split in ("train", "eval"):
        assert sum(s["tokens"] for s in splits[split]["shards"]) == splits[split]["tokens"]
        for shard in splits[split]["shards"]:
            assert os.path.getsize(os.path.join(out, shard["file"])) == shard["tokens"] * itemsize
        docs = [expected[row["key"]] for row in _documents_index(out) if row["split"] == split]
        assert splits[split]["bytes"] == sum(len(t.encode()) for t in docs)
    assert m == load_manifest(out)


def test_bins_decode_back_to_the_documents(prepared, corpus_root):
    out, m = prepared
    expected = _expected_documents(corpus_root)
    tok = load_tokenizer(out)
    eos = m["eos_token_id"]
    index = _documents_index(out)
    assert sorted(row["key"] for row in index) == sorted(expected)
    for split in ("train", "eval"):
        ids = _split_tokens(out, split).tolist()
        # Documents are exactly the eos-terminated pieces, in documents.jsonl order (one eos after each).
        assert ids[-1] == eos
        ids = ids[:-1]
        pieces, current = [], []
        for t in ids:
            if t == eos:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        pieces.append(current)
        rows = [row for row in index if row["split"] == split]
        assert len(pieces) == len(rows)
        for piece, row in zip(pieces, rows):
            assert len(piece) == row["tokens"] and ids[row["offset"]:row["offset"] + row["tokens"]] == piece
            assert tok.decode(piece, skip_special_tokens=False) == expected[row["key"]]
        assert max(ids) < m["vocab_size"]


def test_special_tokens_in_tokenizer_and_manifest(prepared):
    out, m = prepared
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert tok.token_to_id("<|mask|>") == m["mask_token_id"] == m["tokenizer"]["mask_token_id"]
    assert tok.token_to_id("<|endoftext|>") == m["eos_token_id"] == m["tokenizer"]["eos_token_id"]
    assert m["mask_token_id"] != m["eos_token_id"]
    assert m["vocab_size"] == tok.get_vocab_size() <= VOCAB
    assert m["dtype"] == "uint16" and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    # The mask token never occurs in the data (it only appears as TiDAR's draft input).
    for split in ("train", "eval"):
        assert m["mask_token_id"] not in set(_split_tokens(out, split).tolist())


def test_heldout_is_whole_documents_and_stable(tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        (src / f"mod{i:02d}.py").write_text(f"x_{i} = {i}\n" * (i + 1))
    m1 = prepare_corpus(tmp_path / "o1", sources=[str(src)], vocab_size=VOCAB, heldout_fraction=0.25, seed=3)
    m2 = prepare_corpus(tmp_path / "o2", sources=[str(src)], vocab_size=VOCAB, heldout_fraction=0.25, seed=3)

    def assignment(out):
        return {row["key"]: row["split"] for row in _documents_index(out)}

    a1, a2 = assignment(tmp_path / "o1"), assignment(tmp_path / "o2")
    assert a1 == a2 and len(a1) == 40
    n_eval = sum(s == "eval" for s in a1.values())
    assert 3 <= n_eval <= 20  # ~10 expected from a 25% hash split
    assert m1["splits"]["eval"]["files"] == n_eval == m1["splits"]["eval"]["documents"]
    # Whole files: each eval file's full text is in eval, and no eval file contributes to train.
    assert m1["corpus_fingerprint"] == m2["corpus_fingerprint"]
    # Stable under corpus growth: files already there keep their split when new files arrive.
    for i in range(40, 60):
        (src / f"mod{i:02d}.py").write_text(f"y_{i} = {i}\n")
    prepare_corpus(tmp_path / "o3", sources=[str(src)], vocab_size=VOCAB, heldout_fraction=0.25, seed=3)
    a3 = assignment(tmp_path / "o3")
    assert {k: a3[k] for k in a1} == a1
    # Another seed gives another split.
    prepare_corpus(tmp_path / "o4", sources=[str(src)], vocab_size=VOCAB, heldout_fraction=0.25, seed=4)
    assert assignment(tmp_path / "o4") != a3


def test_idempotent_and_change_detection(tmp_path, corpus_root, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.txt").write_text("alpha beta gamma\n" * 20)
    (src / "two.txt").write_text("delta epsilon\n" * 20)
    out = tmp_path / "out"
    m1 = prepare_corpus(out, sources=[str(src)], vocab_size=VOCAB)
    mtime = os.path.getmtime(out / "train-00000.bin")

    def fail(*a, **k):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(corpus_mod, "_build", fail)
    assert prepare_corpus(out, sources=[str(src)], vocab_size=VOCAB) == m1
    assert os.path.getmtime(out / "train-00000.bin") == mtime
    monkeypatch.undo()
    (src / "two.txt").write_text("changed content\n")
    with pytest.raises(DataError, match="different prepared corpus"):
        prepare_corpus(out, sources=[str(src)], vocab_size=VOCAB)
    m2 = prepare_corpus(out, sources=[str(src)], vocab_size=VOCAB, overwrite=True)
    assert m2["fingerprint"] != m1["fingerprint"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temp or old dirs left behind
    # A damaged corpus (truncated token file) is not trusted as "already prepared".
    with open(out / "train-00000.bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(DataError, match="different prepared corpus"):
        prepare_corpus(out, sources=[str(src)], vocab_size=VOCAB)


def test_failure_midway_leaves_no_out_dir(tmp_path, corpus_root, monkeypatch):
    def boom(path, manifest):
        assert os.path.exists(os.path.join(os.path.dirname(path), "train-00000.bin"))  # really midway: bins written
        raise RuntimeError("injected failure")

    monkeypatch.setattr(corpus_mod, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="injected"):
        prepare_corpus(tmp_path / "out", sources=[corpus_root], vocab_size=VOCAB)
    assert os.listdir(tmp_path) == []


def test_external_tokenizer_file_and_added_mask(prepared, corpus_root, tmp_path):
    out, m = prepared
    reuse = prepare_corpus(tmp_path / "reuse", sources=[corpus_root], tokenizer=out, heldout_fraction=0.3)
    assert reuse["tokenizer"]["kind"] == "file" and reuse["tokenizer"]["added_special_tokens"] == []
    for split in ("train", "eval"):
        assert np.array_equal(_split_tokens(tmp_path / "reuse", split), _split_tokens(out, split))
    # A tokenizer with neither known eos nor mask spelling gets both added as new special tokens.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    bare.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (tmp_path / "hf").mkdir()
    bare.save(str(tmp_path / "hf" / "tokenizer.json"))
    added = prepare_corpus(tmp_path / "added", sources=[corpus_root], tokenizer=str(tmp_path / "hf"))
    tok = added["tokenizer"]
    assert tok["added_special_tokens"] == ["<|endoftext|>", "<|mask|>"]
    assert tok["vocab_size"] == bare.get_vocab_size() + 2
    saved = load_tokenizer(tmp_path / "added")
    assert saved.token_to_id("<|mask|>") == tok["mask_token_id"] == tok["vocab_size"] - 1


def test_bad_inputs_raise_clear_errors(tmp_path, corpus_root):
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus(tmp_path / "o", sources=[str(tmp_path / "missing")])
    (tmp_path / "x.weird").write_text("hi")
    with pytest.raises(DataError, match=r"unknown extension '\.weird'"):
        prepare_corpus(tmp_path / "o", sources=[str(tmp_path / "x.weird")])
    with pytest.raises(DataError, match="matched no files"):
        prepare_corpus(tmp_path / "o", sources=[str(tmp_path / "*.nothing")])
    with pytest.raises(DataError, match="no usable text"):
        prepare_corpus(tmp_path / "o", sources=[os.path.join(corpus_root, "empty.txt"),
                                                 os.path.join(corpus_root, "latin1.txt")])
    with pytest.raises(DataError, match="vocab_size=10"):
        prepare_corpus(tmp_path / "o", sources=[corpus_root], vocab_size=10)
    with pytest.raises(DataError, match="heldout_fraction"):
        prepare_corpus(tmp_path / "o", sources=[corpus_root], heldout_fraction=1.5)
    with pytest.raises(DataError, match="not a tokenizer.json"):
        prepare_corpus(tmp_path / "o", sources=[corpus_root], tokenizer=str(tmp_path))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("someone else's file")
    with pytest.raises(DataError, match="not empty"):
        prepare_corpus(tmp_path / "full", sources=[corpus_root])
    assert not (tmp_path / "o").exists()


def test_glob_source_and_jsonl_file(tmp_path, corpus_root):
    m = prepare_corpus(tmp_path / "g", sources=[os.path.join(corpus_root, "**", "*.md"),
                                                os.path.join(corpus_root, "recs.jsonl")], vocab_size=VOCAB)
    keys = sorted(row["key"] for row in _documents_index(tmp_path / "g"))
    assert keys == ["recs.jsonl#1", "recs.jsonl#5", "sub/c.md"]
    assert [s["kind"] for s in m["sources"]] == ["glob", "file"]
    assert any(s["reason"] == "empty (whitespace only)" for s in m["skipped"])  # blank.md matched the glob


def test_stdlib_default_source(tmp_path):
    m = prepare_corpus(tmp_path / "std", max_files=6, vocab_size=VOCAB)
    (source,) = m["sources"]
    assert source["kind"] == "stdlib" and "excluding" in source["subset"]
    assert m["truncated"]["by"] == "max_files" and m["truncated"]["files_not_read"] > 100
    index = _documents_index(tmp_path / "std")
    assert len(index) + len(m["skipped"]) == 6
    tok = load_tokenizer(tmp_path / "std")
    ids = _split_tokens(tmp_path / "std", index[0]["split"])
    for row in index:
        assert row["key"].endswith(".py") and "test/" not in row["key"]
        with open(os.path.join(source["path"], row["key"]), encoding="utf-8") as f:
            text = f.read()
        if row["split"] == index[0]["split"]:
            assert tok.decode(ids[row["offset"]:row["offset"] + row["tokens"]].tolist(),
                              skip_special_tokens=False) == text


def test_cli_summary_and_error_exit(tmp_path, corpus_root, capsys):
    assert prepare_cli.main(["--out", str(tmp_path / "c"), "--source", corpus_root, "--vocab-size", str(VOCAB)]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "eval :" in printed and "not valid UTF-8" in printed
    proc = subprocess.run([sys.executable, "-m", "tidar_jax.data.prepare", "--out", str(tmp_path / "d"),
                           "--source", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1
    assert user_lines(proc.stderr) == [f"error: source '{tmp_path / 'nope'}' does not exist "
                                                "(give a directory, glob, text file or .jsonl file)"]


def test_concurrent_preparer_reuses_the_published_copy(tmp_path, corpus_root, monkeypatch):
    import shutil

    first = prepare_corpus(tmp_path / "elsewhere", sources=[corpus_root], vocab_size=VOCAB)
    real_build = corpus_mod._build

    def build_while_another_process_publishes(*args, **kwargs):
        manifest = real_build(*args, **kwargs)
        shutil.copytree(tmp_path / "elsewhere", tmp_path / "out")  # the other process wins the rename
        return manifest

    monkeypatch.setattr(corpus_mod, "_build", build_while_another_process_publishes)
    assert prepare_corpus(tmp_path / "out", sources=[corpus_root], vocab_size=VOCAB) == first
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "out"]  # our temp copy is gone
