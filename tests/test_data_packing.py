"""Packed documents: the packing layout against a plain-Python reference, no cross-document leakage in the model
(packed logits and losses == each document alone, both halves), and packing through the iterator and train config."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.data import PackedDocuments, eval_examples, make_train_iterator
from tidar_jax.data.corpus import FORMAT_VERSION
from tidar_jax.data.shards import TokenStream
from tidar_jax.masks import training_mask
from tidar_jax.model.functional import abstract_model
from tidar_jax.train.step import make_loss_fn

EOS = 0


def _reference_windows(docs, seq_len, block):
    """Plain Python: units (doc + eos + padding to a block multiple) end to end, cut into windows."""
    toks, segs, doc_of = [], [], []
    for d, doc in enumerate(docs):
        unit = list(doc) + [EOS]
        pad = (-len(unit)) % block
        toks += unit + [EOS] * pad
        doc_of += [d] * len(unit) + [-1] * pad
    out = []
    for w in range(len(toks) // seq_len):
        t = toks[w * seq_len:(w + 1) * seq_len]
        owner = doc_of[w * seq_len:(w + 1) * seq_len]
        seg, current, prev = [], 0, None
        for o in owner:
            if o == -1:
                seg.append(0)
                continue
            if o != prev:
                current += 1
                prev = o
            seg.append(current)
        out.append((t, seg))
    return out


def _stream_of(tmp_path, docs, separator_after_last=True):
    flat, spans = [], []
    for doc in docs:
        spans.append((len(flat), len(doc)))
        flat += list(doc) + [EOS]
    path = tmp_path / "s.bin"
    np.array(flat, dtype=np.uint16).tofile(path)
    return TokenStream([{"path": str(path), "tokens": len(flat)}], "uint16"), np.array(spans, np.int64)


@pytest.mark.parametrize("block,seq_len", [(1, 8), (4, 16), (4, 8), (8, 24)])
def test_packing_layout_matches_reference(tmp_path, block, seq_len):
    rng = np.random.default_rng(block * 100 + seq_len)
    lengths = [1, 2, 3, 7, 30, 5, 15, 16, 2, 40, 1] + list(rng.integers(1, 20, size=20))
    docs = [rng.integers(2, 1000, size=n).tolist() for n in lengths]
    stream, spans = _stream_of(tmp_path, docs)
    packed = PackedDocuments(stream, spans, seq_len, block, EOS)
    ref = _reference_windows(docs, seq_len, block)
    assert len(packed) == len(ref) > 5
    for i, (t, s) in enumerate(ref):
        got = packed[i]
        assert got["tokens"].tolist() == t and got["segment_ids"].tolist() == s, i
    # every document starts on a block boundary
    for i in range(len(packed)):
        seg = packed[i]["segment_ids"]
        starts = np.flatnonzero((seg > 0) & (np.concatenate([[-1], seg[:-1]]) != seg))
        assert np.all(starts % block == 0)


# ----------------------------------------------------------------------------------------------------------------
# The model: a packed row == each document alone
# ----------------------------------------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_size=64,
                  mask_token_id=63, block_size=4, dtype="float64", param_dtype="float64")


def _ce(logits_TV, labels_T):
    logp = logits_TV - jax.scipy.special.logsumexp(logits_TV, axis=-1, keepdims=True)
    return -np.take_along_axis(np.asarray(logp), np.asarray(labels_T)[:, None], axis=-1)[:, 0]


def test_packed_row_equals_each_document_alone():
    """Both halves: logits of every real token of a packed row equal the document run alone (padded to a block
    multiple with pad keys hidden, built from the unpacked training mask); the packed loss is the token-weighted
    combination of the documents' own losses. Lengths include one shorter than a block and one of exactly a block."""
    with jax.enable_x64(True):
        _check_packed_equals_alone()


def _check_packed_equals_alone():
    b = CFG.block_size
    rng = np.random.default_rng(0)
    lengths = [2, 7, 3, 11, 4]  # units (with eos, padded): 4, 8, 4, 12, 8 -> 36 tokens
    docs = [rng.integers(2, 60, size=n).astype(np.int32) for n in lengths]
    units = [-(-(n + 1) // b) * b for n in lengths]
    seq_len = sum(units)
    tokens, segs = [], []
    for d, (doc, u) in enumerate(zip(docs, units)):
        tokens += list(doc) + [EOS] * (u - len(doc))
        segs += [d + 1] * (len(doc) + 1) + [0] * (u - len(doc) - 1)
    tokens_1S = jnp.asarray([tokens], jnp.int32)
    segs_1S = jnp.asarray([segs], jnp.int32)

    # random weights straight from numpy (no per-shape init compiles; any weights show leakage)
    graphdef, params = abstract_model(CFG)
    init_rng = np.random.default_rng(1)
    pure = jax.tree.map(lambda a: jnp.asarray((1.0 if a.ndim == 1 else 0.0) + 0.2 * init_rng.standard_normal(a.shape),
                                              a.dtype), nnx.to_pure_dict(params))

    params_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    loss_fn = make_loss_fn(graphdef, params_template, CFG)

    # every document alone, in one batch: S = u_max (the longest unit); the padding after a document (up to its
    # block multiple and on to u_max) is hidden from its real tokens by the reference mask (numpy, from the unpacked
    # training mask)
    u_max = max(units)
    base = np.asarray(training_mask(u_max, b))
    alone_N2S, mask_N2S2S = [], []
    for doc, u in zip(docs, units):
        real = len(doc) + 1  # the document and its eos
        alone = np.concatenate([doc, [EOS] * (u_max - len(doc))]).astype(np.int32)
        alone_N2S.append(np.concatenate([alone, np.full(u_max, CFG.mask_token_id, np.int32)]))
        is_real_T = np.concatenate([np.arange(u_max) < real] * 2)
        allow = base & (is_real_T[None, :] | ~is_real_T[:, None])
        mask_N2S2S.append(allow | np.eye(2 * u_max, dtype=bool))  # pad queries keep one key (outputs unused)
    pos = np.tile(np.concatenate([np.arange(u_max), np.arange(u_max)]).astype(np.int32), (len(docs), 1))

    @jax.jit  # one compile for everything
    def run(pure, tokens_1S, segs_1S, alone_N2S, pos_N2S, mask_N2S2S):
        from tidar_jax.train.step import tidar_inputs, to_model
        model = to_model(graphdef, params_template, pure)
        tok2, pos2, mask2 = tidar_inputs(tokens_1S, CFG, segs_1S)
        packed = model(tok2, pos2, mask2)[0]
        return packed, loss_fn(pure, tokens_1S, segs_1S), model(alone_N2S, pos_N2S, mask_N2S2S)[0]

    packed, (loss, metrics), alone_logits = run(pure, tokens_1S, segs_1S, jnp.asarray(np.stack(alone_N2S)),
                                                       jnp.asarray(pos), jnp.asarray(np.stack(mask_N2S2S)))
    packed_logits, alone_logits = np.asarray(packed)[0], np.asarray(alone_logits)

    ar_sum = diff_sum = 0.0
    ar_n = diff_n = 0
    offset = 0
    for d, (doc, u) in enumerate(zip(docs, units)):
        n = len(doc)
        real = n + 1
        for half in (0, 1):
            np.testing.assert_allclose(packed_logits[half * seq_len + offset:half * seq_len + offset + real],
                                       alone_logits[d, half * u_max:half * u_max + real], rtol=1e-9, atol=1e-9)
        target = np.concatenate([doc, [EOS]])
        ar_sum += _ce(alone_logits[d, :n], target[1:]).sum()  # clean i predicts i+1, inside the document
        ar_n += n
        diff_sum += _ce(alone_logits[d, u_max:u_max + real], target).sum()  # mask i predicts x_i, eos included
        diff_n += real
        offset += u
    np.testing.assert_allclose(float(metrics["ar_loss"]), ar_sum / ar_n, rtol=1e-9)
    np.testing.assert_allclose(float(metrics["diff_loss"]), diff_sum / diff_n, rtol=1e-9)
    assert float(metrics["ar_tokens"]) == ar_n and float(metrics["diff_tokens"]) == diff_n
    np.testing.assert_allclose(float(loss), (ar_sum / ar_n + diff_sum / diff_n) / 2, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# The iterator
# ----------------------------------------------------------------------------------------------------------------

def _write_v1_dir(path, docs, fingerprint="p" * 64):
    """A format-1 data dir (eos between documents) with a documents.jsonl, like corpora prepared before format 2."""
    os.makedirs(path)
    flat, rows = [], []
    for i, doc in enumerate(docs):
        if i:
            flat.append(EOS)
        rows.append({"key": f"d{i}", "path": "x", "split": "train", "offset": len(flat), "tokens": len(doc)})
        flat += list(doc)
    np.array(flat, np.uint16).tofile(os.path.join(path, "train.bin"))
    np.array([5, 6, 7, EOS, 8, 9], np.uint16).tofile(os.path.join(path, "eval.bin"))
    rows += [{"key": "e0", "path": "y", "split": "eval", "offset": 0, "tokens": 3},
             {"key": "e1", "path": "y", "split": "eval", "offset": 4, "tokens": 2}]
    with open(os.path.join(path, "documents.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    manifest = {"format_version": 1, "fingerprint": fingerprint, "dtype": "uint16", "eos_token_id": EOS,
                "documents_file": "documents.jsonl",
                "splits": {"train": {"file": "train.bin", "tokens": len(flat)}, "eval": {"file": "eval.bin",
                                                                                      "tokens": 6}}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(path)


def test_iterator_yields_packed_windows_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 1000, size=n).tolist() for n in rng.integers(1, 30, size=60)]
    d = _write_v1_dir(tmp_path / "v1", docs)
    ref = _reference_windows(docs, 16, 4)
    it = make_train_iterator(d, seq_len=16, global_batch=4, seed=0, packing="documents", block_size=4)
    seen = []
    for _ in range(len(ref) // 4):
        batch = next(it)
        assert set(batch) == {"tokens", "segment_ids"} and batch["segment_ids"].dtype == np.int32
        seen += [(r.tolist(), s.tolist()) for r, s in zip(batch["tokens"], batch["segment_ids"])]
    ref_set = {(tuple(t), tuple(s)) for t, s in ref}
    seen_set = {(tuple(t), tuple(s)) for t, s in seen}
    assert seen_set <= ref_set and len(seen_set) == len(seen)  # real packed windows, each once in an epoch
    state = it.get_state()
    assert state["spec"]["packing"] == "documents" and state["spec"]["block_size"] == 4
    want = [next(it) for _ in range(3)]
    again = make_train_iterator(d, seq_len=16, global_batch=4, seed=0, packing="documents", block_size=4)
    again.set_state(state)
    for w in want:
        got = next(again)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    windows = make_train_iterator(d, seq_len=16, global_batch=4, seed=0)
    with pytest.raises(Exception, match="packing"):
        windows.set_state(state)
    ev = eval_examples(d, seq_len=4, batch_size=1, packing="documents", block_size=4)
    assert [e["tokens"].tolist() for e in ev] == [[[5, 6, 7, EOS]], [[8, 9, EOS, EOS]]]
    assert [e["segment_ids"].tolist() for e in ev] == [[[1, 1, 1, 1]], [[1, 1, 1, 0]]]


def test_packing_config_default_and_old_run_dirs(tmp_path):
    from tidar_jax.train.config import TrainConfig, dump_yaml
    from tidar_jax.train.loop import resolve_packing

    cfg = TrainConfig()
    assert cfg.data.packing is None
    assert resolve_packing(cfg, str(tmp_path / "new")) == "documents"
    old = tmp_path / "old"
    old.mkdir()
    saved = cfg.to_dict()
    del saved["data"]["packing"]  # a run dir written before data.packing existed
    import yaml
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resolve_packing(cfg, str(old)) == "windows"
    (old / "config.yaml").write_text(dump_yaml(cfg))  # a run started by this code with packing: null
    assert resolve_packing(cfg, str(old)) == "documents"
    (old / "config.yaml").write_text(dump_yaml(cfg.replace(**{"data.packing": "windows"})))
    assert resolve_packing(cfg, str(old)) == "windows"
    assert resolve_packing(cfg.replace(**{"data.packing": "windows"}), str(tmp_path / "new")) == "windows"
    with pytest.raises(Exception, match="data.packing"):
        cfg.replace(**{"data.packing": "rows"})
    assert FORMAT_VERSION == 2
