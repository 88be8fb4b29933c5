"""The paper's recipe: an AR run, then a TiDAR run initialised from it (``model.init_from``), as two phases of one
preset (``tidar_jax/train/phases.py``).

* A TiDAR run from an AR run starts from the AR run's exact parameters, for any block size and mask token, with a
  fresh optimizer state; so its first logits equal the AR run's.
* An architecture, vocabulary or tokenizer that disagrees with the AR run, and an ``init_from`` that is missing, a
  file or damaged, each give one line (non-zero exit from ``train.py``).
* A phased preset trains both phases; re-running skips the finished AR phase and resumes the TiDAR phase.
* The TiDAR phase's self-generated draft data is the AR run's own greedy continuation of train-split prompts,
  token for token, made once (a rerun reuses it); asking for it without an AR model to write it is one line.
* The invariants hold for the recipe-trained model: lossless TiDAR == AR (float64), the mask half never sees
  later clean tokens, and HF transformers gives the same logits on the exported weights.

One tiny corpus and one two-phase run (4 AR + 4 TiDAR steps on 8 fake devices) are shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from tidar_jax.config import ConfigError
from tidar_jax.train.config import load_config, read_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
AR_STEPS, TIDAR_STEPS = 4, 4
SELFGEN_ROWS = 8  # the TiDAR phase also trains on the AR model's own continuations, as tiny.yaml's does


def _base(train_corpus) -> dict:
    """tiny.yaml's base sections shrunk to a test model on the test corpus."""
    values = read_preset(TINY)
    values.pop("phases", None)
    values["model"].update(vocab_size=384, hidden_size=32, num_layers=1, mlp_size=64, num_heads=4, num_kv_heads=2)
    values["data"].update(dir=train_corpus, vocab_size=384, seq_len=16, global_batch=8, eval_batch_size=8,
                          eval_batches=1)
    values["checkpoint"] = {"every": 2, "keep": 2, "async_save": False}
    values["logging"] = {"every": 1, "eval_every": 0, "tensorboard": False, "decode_probe_prompts": 0}
    values["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1}
    return values


@pytest.fixture(scope="module")
def preset(train_corpus, tmp_path_factory):
    values = _base(train_corpus)
    values["phases"] = [{"name": "ar", "train.objective": "ar", "train.steps": AR_STEPS},
                        {"name": "tidar", "init_from": "ar", "train.steps": TIDAR_STEPS, "optim.lr": 1e-3,
                         "data.selfgen_rows": SELFGEN_ROWS, "data.selfgen_prompt_tokens": 4}]
    path = tmp_path_factory.mktemp("preset") / "recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def recipe_run(preset, tmp_path_factory):
    import train as train_cli

    run_dir = str(tmp_path_factory.mktemp("recipe") / "run")
    assert train_cli.main(["--config", preset, "--run-dir", run_dir]) == 0
    return run_dir


def _ar_dir(run_dir):
    return os.path.join(run_dir, "phases", "ar")


def _pure(bundle):
    return jax.device_get(nnx.to_pure_dict(bundle.params))


def test_phases_train_both_and_resume_skips_the_finished_one(recipe_run, preset, capsys):
    import train as train_cli
    from tidar_jax.loading import load_for_inference

    ar = load_for_inference(_ar_dir(recipe_run))
    tidar = load_for_inference(recipe_run)
    assert (ar.step, ar.config.block_size) == (AR_STEPS, None)
    assert (tidar.step, tidar.config.block_size) == (TIDAR_STEPS, 4)
    saved = yaml.safe_load(open(os.path.join(recipe_run, "config.yaml")))
    assert saved["model"]["init_from"] == os.path.abspath(_ar_dir(recipe_run))
    assert saved["train"]["objective"] == "tidar" and saved["optim"]["lr"] == pytest.approx(1e-3)
    capsys.readouterr()
    assert train_cli.main(["--config", preset, "--run-dir", recipe_run]) == 0
    out = capsys.readouterr().out
    assert f"phase 1/2 'ar' (ar, from scratch) in {_ar_dir(recipe_run)}: done (step {AR_STEPS}), skipped" in out
    assert f"resuming {recipe_run} from step {TIDAR_STEPS}" in out
    assert load_for_inference(recipe_run).step == TIDAR_STEPS  # nothing retrained


@pytest.mark.parametrize("source,block_size,mask_token_id", [("run", 2, 5), ("run", 8, 300), ("run", 4, None),
                                                               ("hf", 4, 7)])
def test_tidar_run_starts_from_the_ar_runs_exact_params(recipe_run, preset, tmp_path, source, block_size,
                                                        mask_token_id):
    """Any block size and mask token, from the AR run dir or from its HF export (the same code path): the same
    params bit for bit (so the same logits), a new optimizer state."""
    from tidar_jax.loading import load_for_inference
    from tidar_jax.hf import export_hf
    from tidar_jax.model import causal_mask
    from tidar_jax.train.loop import setup
    from tidar_jax.train.step import to_model

    ar = load_for_inference(_ar_dir(recipe_run))
    init_from = _ar_dir(recipe_run)
    if source == "hf":
        init_from = export_hf(ar.config, ar.params, str(tmp_path / "hf"),
                              tokenizer_path=os.path.join(init_from, "tokenizer.json"))
    cfg = load_config(preset, [f"{k}={v}" for k, v in
                               {"data.eval_batches": 0, "model.init_from": init_from, "model.block_size": block_size,
                                "model.mask_token_id": "null" if mask_token_id is None else mask_token_id,
                                "train.steps": 1}.items()])
    run = setup(cfg, str(tmp_path / "run"), show_progress=False)
    try:
        assert run.mcfg.block_size == block_size
        assert run.mcfg.mask_token_id == (mask_token_id if mask_token_id is not None else ar.config.mask_token_id)
        got, want = jax.device_get(run.state["params"]), _pure(ar)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
        opt = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(run.state["opt"]))]
        assert opt and all(not x.any() for x in opt)  # fresh Adam moments and counts (zeros), not the AR run's
        assert int(run.state["step"]) == 0 and run.start == 0
        tokens = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % 300, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
        mine = to_model(run.graphdef, run.fns.template, run.state["params"])(tokens, pos, causal_mask(2, 16))[0]
        theirs = nnx.merge(ar.graphdef, ar.params)(tokens, pos, causal_mask(2, 16))[0]
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    finally:
        run.ckpts.close()
        run.writer.close()


@pytest.mark.parametrize("override,named", [("model.hidden_size=64", "model.hidden_size=64"),
                                            ("model.vocab_size=512", "model.vocab_size=512")])
def test_architecture_or_vocab_mismatch_is_one_line(recipe_run, preset, tmp_path, override, named):
    from tidar_jax.train.loop import setup

    cfg = load_config(preset, [f"model.init_from={_ar_dir(recipe_run)}", override])
    with pytest.raises(ConfigError) as e:
        setup(cfg, str(tmp_path / "run"), show_progress=False)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")  # nothing half-written


def test_other_tokenizer_is_one_line(recipe_run, preset, tmp_path):
    from tidar_jax.train.loop import setup

    other = tmp_path / "ar_other_tokenizer"
    shutil.copytree(_ar_dir(recipe_run), other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ids swapped: the same strings mean other ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = load_config(preset, [f"model.init_from={other}"])
    with pytest.raises(ConfigError, match="another tokenizer") as e:
        setup(cfg, str(tmp_path / "run"), show_progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["missing", "file", "damaged_config", "damaged_checkpoint"])
def test_bad_init_from_exits_with_one_line(recipe_run, preset, tmp_path, kind):
    import train as train_cli

    bad = tmp_path / "bad"
    if kind == "file":
        bad.write_text("not a checkpoint")
    elif kind.startswith("damaged"):
        shutil.copytree(_ar_dir(recipe_run), bad)
        if kind == "damaged_config":
            (bad / "model_config.json").write_text("{ not json")
        else:
            for step in os.listdir(bad / "checkpoints"):
                shutil.rmtree(bad / "checkpoints" / step / "state")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--no-phases", "--config", preset, "--run-dir", str(run_dir), f"model.init_from={bad}"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: model.init_from={str(bad)!r}") and "\n" not in msg, msg
    assert not run_dir.exists()


def test_phase_overrides_and_errors(preset, tmp_path):
    from tidar_jax.train.phases import load_phases

    ar, tidar = load_phases(preset, ["optim.min_lr=1e-5", "tidar.train.steps=9"], str(tmp_path))
    assert (ar.cfg.train.steps, tidar.cfg.train.steps) == (AR_STEPS, 9)
    assert ar.cfg.optim.min_lr == tidar.cfg.optim.min_lr == pytest.approx(1e-5)
    assert ar.run_dir == str(tmp_path / "phases" / "ar") and tidar.run_dir == str(tmp_path)
    assert ar.cfg.model.init_from is None and tidar.cfg.model.init_from == os.path.abspath(ar.run_dir)
    with pytest.raises(ConfigError, match="'draft' is not a phase"):
        load_phases(preset, ["draft.train.steps=3"], str(tmp_path))
    values = yaml.safe_load(open(preset))
    values["phases"][0]["init_from"] = "tidar"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="must name an earlier phase"):
        load_phases(str(bad), [], str(tmp_path))
    # load_config reads the base sections (the preset from scratch), never the phases
    assert load_config(preset).train.objective == "tidar" and load_config(preset).model.init_from is None


def test_recipe_trained_model_lossless_equals_ar(recipe_run):
    from tidar_jax.loading import load_for_inference
    from tidar_jax.decode import Decoder

    with jax.enable_x64(True):
        bundle = load_for_inference(recipe_run)
        dec = Decoder.from_bundle(bundle, dtype="float64")
        prompts = [[5, 17, 40, 9, 3], [100, 7], [12, 12, 12, 200, 31, 8, 64]]
        ar = dec.generate(prompts, mode="ar", max_new_tokens=12, eos_token_id=None)
        td = dec.generate(prompts, mode="tidar", block_size=4, beta=1.0, slot0="verifier", max_new_tokens=12,
                          eos_token_id=None)
        assert td.tokens == ar.tokens


def test_recipe_trained_model_mask_half_never_sees_later_clean_tokens(recipe_run):
    from tidar_jax import masks
    from tidar_jax.loading import load_for_inference
    from tidar_jax.model import causal_mask

    bundle = load_for_inference(recipe_run)
    model = nnx.merge(bundle.graphdef, bundle.params)
    S, B, cfg = 12, bundle.config.block_size, bundle.config
    pos, mask = masks.training_positions(S)[None], masks.training_mask(S, B)[None]
    clean = jnp.asarray(np.arange(3, 3 + S)[None] * 7 % 380, jnp.int32)
    half = jnp.full_like(clean, cfg.mask_token_id)
    ref = np.asarray(model(jnp.concatenate([clean, half], 1), pos, mask)[0])
    causal = np.asarray(model(clean, pos[:, :S], causal_mask(1, S))[0])
    np.testing.assert_allclose(ref[:, :S], causal, rtol=0, atol=1e-5)  # the clean half is a plain causal LM
    for b in range(S // B):
        changed = clean.at[:, b * B:].set((clean[:, b * B:] + 11) % 380)
        out = np.asarray(model(jnp.concatenate([changed, half], 1), pos, mask)[0])
        np.testing.assert_array_equal(out[:, S:S + (b + 1) * B], ref[:, S:S + (b + 1) * B])
        if b * B + B < S:
            assert not np.allclose(out[:, S + (b + 1) * B:], ref[:, S + (b + 1) * B:])  # the check can fail


def test_recipe_trained_model_matches_transformers(recipe_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tidar_jax.loading import load_for_inference
    from tidar_jax.hf import export_hf
    from tidar_jax.model import causal_mask

    bundle = load_for_inference(recipe_run)
    out = export_hf(bundle.config, bundle.params, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = np.array([[5, 17, 40, 9, 3, 100, 7, 12]], np.int64)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    model = nnx.merge(bundle.graphdef, bundle.params)
    mine = np.asarray(model(jnp.asarray(tokens, jnp.int32), jnp.arange(8)[None], causal_mask(1, 8))[0])
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)


def test_selfgen_rows_are_the_ar_models_greedy_continuations(recipe_run, train_corpus):
    from tidar_jax.data import load_manifest
    from tidar_jax.data.shards import TokenStream, document_spans, split_parts
    from tidar_jax.decode import Decoder
    from tidar_jax.loading import load_for_inference
    from tidar_jax.train.selfgen import build_selfgen, train_prompts

    out = os.path.join(recipe_run, "selfgen")
    manifest = load_manifest(out)
    spans = document_spans(out, manifest, "train")
    stream = TokenStream(split_parts(out, manifest, "train"), manifest["dtype"])
    rows = [stream.read(int(o), int(o) + int(n)).tolist() for o, n in spans]
    seq_len, block = 16, 4
    assert len(rows) == SELFGEN_ROWS and all(len(r) == seq_len - block for r in rows)  # row + eos = one window
    prompts = train_prompts(train_corpus, load_manifest(train_corpus), SELFGEN_ROWS, 4, 0)
    ar = Decoder.from_bundle(load_for_inference(_ar_dir(recipe_run)))
    gen = ar.generate(prompts, mode="ar", max_new_tokens=seq_len - block - 4, eos_token_id=None)
    assert rows == [p + list(t) for p, t in zip(prompts, gen.tokens)]
    assert manifest["tokenizer"]["sha256"] == load_manifest(train_corpus)["tokenizer"]["sha256"]
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    build_selfgen(_ar_dir(recipe_run), train_corpus, out, SELFGEN_ROWS, 4, seq_len, block)  # same settings: reused
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp


@pytest.mark.parametrize("override,named", [(["train.objective=tidar"], "data.selfgen_rows=8"),
                                            (["model.init_from=x", "data.selfgen_weight=1.0"],
                                             "data.selfgen_weight=1.0"),
                                            (["model.init_from=x", "data.selfgen_prompt_tokens=124"],
                                             "data.selfgen_prompt_tokens=124")])
def test_selfgen_bad_settings_are_one_line(train_corpus, override, named):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.selfgen_rows=8", *override])
    assert str(e.value).startswith(named) and "\n" not in str(e.value)


@pytest.mark.slow
def test_selfgen_source_takes_its_weight_of_the_mixture(recipe_run, train_corpus):
    from tidar_jax.train.loop import data_sources

    sg = os.path.join(recipe_run, "selfgen")
    one = load_config(TINY, [f"data.dir={train_corpus}", "model.init_from=x", "data.selfgen_rows=8",
                             "data.selfgen_weight=0.25"])
    assert data_sources(one, train_corpus) == train_corpus  # no self-generated dir given: the data dir alone
    assert data_sources(one, train_corpus, sg) == [(os.path.abspath(train_corpus), 0.75), (os.path.abspath(sg), 0.25)]
    two = one.replace(**{"data.sources": [{"dir": train_corpus, "weight": 3}, {"dir": sg, "weight": 1}]})
    got = data_sources(two, train_corpus, sg)
    assert [w for _, w in got] == pytest.approx([0.5625, 0.1875, 0.25])
