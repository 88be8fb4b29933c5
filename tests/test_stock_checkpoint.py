"""A stock Hugging Face checkpoint without a [MASK] token (every Llama-family model) has no dead end:

* AR decoding needs no mask token (greedy output == transformers' greedy ``generate``);
* TiDAR decoding says how to add one, and ``decode.py --add-mask-token`` does (untrained drafts, output == AR);
* data prepared with the model's tokenizer and ``model.init_from`` of the same directory agree on the appended
  ``<|mask|>`` (the embedding and an untied head grow by one row, the mean of the others); data whose [MASK] id
  differs stops with one line.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

from test_hf_support import hf_model, save_hf_dir, word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import decode  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """(transformers model, HF dir): a random untied Llama whose tokenizer has an EOS but no mask token."""
    model = hf_model("llama", False, vocab=VOCAB, seed=5)
    tok = word_tokenizer(VOCAB - 1, extra_specials=("<|endoftext|>",))  # ids 0..94 words, 95 <|endoftext|>
    path = save_hf_dir(model, tmp_path_factory.mktemp("stock") / "hf", tokenizer=tok)
    with open(os.path.join(path, "config.json")) as f:
        assert "mask_token_id" not in json.load(f)
    return model, path


def test_ar_decode_needs_no_mask_token(stock):
    import torch

    from tidar_jax.decode import Decoder, DecodeError
    from tidar_jax.hf import load_hf_dir

    model, path = stock
    bundle = load_hf_dir(path)
    assert bundle.config.mask_token_id is None and bundle.config.vocab_size == VOCAB
    decoder = Decoder.from_bundle(bundle)
    prompts = [[5, 9, 12, 40], [7, 7, 3]]
    got = decoder.generate(prompts, mode="ar", max_new_tokens=10, eos_token_id=None).tokens
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()
    with pytest.raises(DecodeError, match="no \\[MASK\\] token.*--add-mask-token"):
        decoder.generate(prompts, mode="tidar", block_size=4, allow_untrained_block_size=True)


def test_decode_cli_ar_and_added_mask_token(stock, capsys):
    _, path = stock
    common = ["--checkpoint", path, "--prompt-ids", "5,9,12,40", "--max-new-tokens", "8", "--json"]
    assert decode.main(common + ["--mode", "ar"]) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with pytest.raises(SystemExit) as e:
        decode.main(common + ["--block-size", "4", "--allow-untrained-block-size"])
    assert "--add-mask-token" in str(e.value) and "\n" not in str(e.value)
    assert decode.main(common + ["--add-mask-token", "--block-size", "4", "--allow-untrained-block-size"]) == 0
    tidar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tidar["tokens"] == ar["tokens"]  # lossless: an untrained drafter costs speed, never output


def _corpus(tmp_path, n_docs=24):
    rng = np.random.RandomState(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n_docs):
        (src / f"d{i}.txt").write_text(" ".join(f"t{w}" for w in rng.randint(0, VOCAB - 1, 150)))
    return str(src)


def test_init_from_stock_dir_with_data_from_its_tokenizer(stock, tmp_path):
    from tidar_jax.config import ConfigError
    from tidar_jax.data import prepare_corpus
    from tidar_jax.train.config import load_config
    from tidar_jax.train.loop import setup

    model, path = stock
    src = _corpus(tmp_path)
    manifest = prepare_corpus(str(tmp_path / "data"), sources=[src], tokenizer=path, progress=False)
    assert (manifest["mask_token_id"], manifest["vocab_size"]) == (VOCAB, VOCAB + 1)  # <|mask|> appended
    overrides = {"data.dir": str(tmp_path / "data"), "data.prepare": "false", "data.seq_len": 32,
                 "data.global_batch": 8, "data.eval_batches": 0, "model.init_from": path, "model.block_size": 4,
                 "train.steps": 1, "logging.tensorboard": "false"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    run = setup(cfg, str(tmp_path / "run"), show_progress=False)
    try:
        assert (run.mcfg.mask_token_id, run.mcfg.vocab_size) == (VOCAB, VOCAB + 1)
        params = jax.device_get(run.state["params"])
        sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        embed, head = np.asarray(params["embed"]), np.asarray(params["lm_head"])
        np.testing.assert_array_equal(embed[:VOCAB], sd["model.embed_tokens.weight"])
        np.testing.assert_allclose(embed[VOCAB], sd["model.embed_tokens.weight"].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(head[:, VOCAB], sd["lm_head.weight"].mean(0), rtol=1e-5, atol=1e-6)
    finally:
        run.ckpts.close()

    # data prepared with another tokenizer (no EOS: preparation adds <|endoftext|>=96, then <|mask|>=97)
    other = tmp_path / "other_tok.json"
    word_tokenizer(VOCAB).save(str(other))
    prepare_corpus(str(tmp_path / "data2"), sources=[src], tokenizer=str(other), progress=False)
    bad = load_config(None, [f"{k}={v}" for k, v in {**overrides, "data.dir": str(tmp_path / "data2")}.items()])
    with pytest.raises(ConfigError) as e:
        setup(bad, str(tmp_path / "run2"), show_progress=False)
    msg = str(e.value)
    assert "<|mask|>=97" in msg and "id 96" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "run2")  # nothing half-written


def test_plan_of_a_stock_config_counts_the_appended_mask_token(stock, tmp_path):
    """``decode.py --plan --hf-config`` of a stock model plans the model TiDAR trains from it (``<|mask|>``
    appended: one more vocabulary row); an unsupported config stops with one line naming the file."""
    from tidar_jax.analysis.decode_plan import model_config_for_plan
    from tidar_jax.config import ConfigError

    config_json = os.path.join(stock[1], "config.json")
    cfg = model_config_for_plan(None, config_json, "bfloat16")
    assert (cfg.vocab_size, cfg.mask_token_id) == (VOCAB + 1, VOCAB)
    with open(config_json) as f:
        bad = {**json.load(f), "hidden_act": "gelu"}
    bad_json = tmp_path / "config.json"
    bad_json.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"--hf-config=.*hidden_act='gelu' is not supported"):
        model_config_for_plan(None, str(bad_json), "bfloat16")
