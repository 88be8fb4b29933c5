"""A real model through the whole path a user takes to serve one: SmolLM2-135M-Instruct (fetched by
``tidar_jax.pretrained``; skipped, saying why, where it cannot be fetched) is imported, trained for two TiDAR steps
and exported as a plain Hugging Face directory. transformers loads the export, its tokenizer renders the source
model's chat template, and ``generate`` on the templated prompt gives our AR greedy tokens (up to the first EOS the
export's generation config lists).

Slow (about a minute on two cores): a 135M-parameter model's training step compiles and runs on CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

NAME = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
STEPS = 8


@pytest.fixture(scope="module")
def source():
    from tidar_jax import pretrained

    try:
        return pretrained.fetch(NAME)
    except pretrained.FetchError as e:
        pytest.skip(f"{NAME} cannot be fetched: {e}")


@pytest.mark.slow
def test_real_model_import_train_export_chats_in_transformers(source, tmp_path):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import train as train_cli
    from tidar_jax.convert import main as convert
    from tidar_jax.data import prepare_corpus
    from tidar_jax.decode import generate
    from tidar_jax.loading import load_for_inference

    from test_recipe import _base

    src_template = json.load(open(os.path.join(source, "tokenizer_config.json"))).get("chat_template")
    assert src_template, "the source model has a chat template"
    ckpt = str(tmp_path / "ckpt")
    assert convert(["import-hf", source, ckpt, "--add-mask-token"]) == 0
    corpus = str(tmp_path / "corpus")
    prepare_corpus(corpus, tokenizer=os.path.join(ckpt, "tokenizer.json"), max_files=4, progress=False)

    values = _base(corpus)
    values.pop("phases", None)
    values["model"] = {"init_from": ckpt, "block_size": 4}
    values["train"].update(objective="tidar", steps=2)
    values["data"].pop("vocab_size", None)
    values["data"].update(eval_batches=0, selfgen_rows=0)
    values["mesh"] = {"data": 1, "fsdp": -1, "tensor": 1}  # params and Adam state sharded over the 8 fake devices
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(values, sort_keys=False))
    run = str(tmp_path / "run")
    assert train_cli.main(["--no-phases", "--config", str(preset), "--run-dir", run]) == 0

    out = str(tmp_path / "hf")
    assert convert(["export-hf", run, out]) == 0
    src_config = json.load(open(os.path.join(source, "config.json")))
    out_config = json.load(open(os.path.join(out, "config.json")))
    assert out_config["max_position_embeddings"] == src_config["max_position_embeddings"]  # not the family default
    assert out_config["block_size"] == 4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == src_template
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "What is the capital of France?" in text and text != MESSAGES[0]["content"]
    prompt = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=STEPS, do_sample=False,
                                attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()

    ours = np.asarray(generate(load_for_inference(run), [prompt[0].tolist()], mode="ar", max_new_tokens=STEPS,
                               eos_token_id=None).tokens)[0].tolist()
    assert theirs == ours[:len(theirs)]
    assert len(theirs) == STEPS or theirs[-1] in eos  # transformers stopped only at an EOS of the export
