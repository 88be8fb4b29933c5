"""What a server reads beside the weights (``tidar_jax.hf.serving``) goes from the source model through import,
TiDAR training and both exports: the chat template, the generation settings, every EOS id and the context length;
and the block size the server must be given is printed by the export command and named in the export's files.

The source is a small Qwen3-shaped Hugging Face directory with a Qwen-sized vocabulary, Qwen3-8B's two EOS ids and
sampling defaults, a context length that is not the family default, and a ChatML template; transformers reads
every export back (its ``GenerationConfig``, ``AutoConfig`` and the tokenizer's ``apply_chat_template``).
"""

from __future__ import annotations

import json
import os

import pytest

from tidar_jax.convert import main

from test_hf_sglang import ENDOFTEXT, FIM_PAD, qwen_like_tokenizer, random_state, small_config

IM_START, IM_END = 151644, 151645
EOS_IDS = [IM_END, ENDOFTEXT]  # Qwen3's generation_config.json lists both
CONTEXT = 131072  # not the family default (40960): must come from the source
GENERATION = {"bos_token_id": ENDOFTEXT, "do_sample": True, "eos_token_id": EOS_IDS, "pad_token_id": ENDOFTEXT,
              "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
MESSAGES = [{"role": "system", "content": "t1 t2"}, {"role": "user", "content": "t3"}]
RENDERED = "<|im_start|>system\nt1 t2<|im_end|>\n<|im_start|>user\nt3<|im_end|>\n<|im_start|>assistant\n"
BAD_TEMPLATE = "{% for message in messages %}{{ message['content'] }}"  # no endfor
BLOCK = 4


def _tokenizer():
    return qwen_like_tokenizer(specials=((ENDOFTEXT, "<|endoftext|>"), (IM_START, "<|im_start|>"),
                                         (IM_END, "<|im_end|>"), (FIM_PAD, "<|fim_pad|>")))


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def make_source(path, template=CHATML, generation=GENERATION, template_file=None):
    """A source HF dir: weights, config.json, tokenizer, generation_config.json and a chat template in
    tokenizer_config.json (or in chat_template.jinja, ``template_file``)."""
    from tidar_jax.hf import export_hf

    cfg = small_config("qwen3", block_size=None, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       mlp_size=8, head_dim=4, tie_embeddings=True)
    out = export_hf(cfg, random_state(cfg, 0), str(path), tokenizer=_tokenizer(), eos_token_id=IM_END,
                    bos_token_id=None, max_position_embeddings=CONTEXT)
    config = json.load(open(os.path.join(out, "config.json")))
    del config["mask_token_id"], config["block_size"]  # a plain HF model records no TiDAR fields
    _write_json(os.path.join(out, "config.json"), config)
    if generation is None:
        os.remove(os.path.join(out, "generation_config.json"))
    else:
        _write_json(os.path.join(out, "generation_config.json"), generation)
    tc_path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc.update({"chat_template": template} if template is not None else {})
    _write_json(tc_path, tc)
    if template_file is not None:
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(template_file)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    src = make_source(tmp / "src")
    ckpt = str(tmp / "ckpt")
    assert main(["import-hf", src, ckpt, "--block-size", str(BLOCK)]) == 0
    return src, ckpt


def _check_export(out):
    """transformers reads the source's settings back from an export."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    gen = GenerationConfig.from_pretrained(out)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (0.6, 0.95, 20, True)
    assert list(gen.eos_token_id) == EOS_IDS and gen.bos_token_id == ENDOFTEXT
    config = AutoConfig.from_pretrained(out)
    assert config.max_position_embeddings == CONTEXT and list(config.eos_token_id) == EOS_IDS
    assert config.block_size == BLOCK
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    assert tok.eos_token == "<|im_end|>"


def test_import_keeps_the_serving_record(imported):
    from tidar_jax.checkpoint import read_meta

    _, ckpt = imported
    meta = read_meta(ckpt)
    assert meta.eos_token_ids == tuple(EOS_IDS)  # every EOS id, the first the default
    assert meta.hf["generation_config"] == GENERATION and meta.hf["chat_template"] == CHATML
    assert meta.hf["max_position_embeddings"] == CONTEXT


def test_plain_export_writes_it_back(imported, tmp_path, capsys):
    _, ckpt = imported
    out = str(tmp_path / "plain")
    assert main(["export-hf", ckpt, out]) == 0
    printed = capsys.readouterr().out
    assert f"trained block size {BLOCK} (config.json block_size)" in printed
    assert f"--speculative-tidar-b {BLOCK}" in printed
    _check_export(out)


def test_server_export_writes_it_back_and_names_the_block_size(imported, tmp_path, capsys):
    _, ckpt = imported
    out = str(tmp_path / "sglang")
    assert main(["export-hf", ckpt, out, "--for", "sglang-tidar"]) == 0
    printed = capsys.readouterr().out.splitlines()
    notice = [ln for ln in printed if "--speculative-tidar-b" in ln]
    assert len(notice) == 1 and f"start the server with --speculative-tidar-b {BLOCK};" in notice[0]
    assert "the server drafts 16 and serves this model wrongly" in notice[0]  # BLOCK != the server's default
    assert os.path.join(os.path.abspath(out), "README.md") in notice[0]
    _check_export(out)
    readme = open(os.path.join(out, "README.md")).read()
    first = [ln for ln in readme.splitlines() if ln.strip()][1]  # the line under the title
    assert f"Block size {BLOCK}: start the server with `--speculative-tidar-b {BLOCK}`" in first
    assert "left out, it would serve this model wrongly" in first
    assert "temperature 0.6, top_p 0.95, top_k 20" in readme and "/v1/chat/completions" in readme
    assert f"context length {CONTEXT}" in readme and f"EOS token id(s) {EOS_IDS}" in readme


def test_an_hf_dir_exports_its_own_record(imported, tmp_path):
    """export-hf straight from an HF dir reads the record there."""
    src, _ = imported
    out = str(tmp_path / "from_hf")
    assert main(["export-hf", src, out]) == 0
    from transformers import AutoTokenizer, GenerationConfig

    assert GenerationConfig.from_pretrained(out).temperature == 0.6
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False,
                                                                  add_generation_prompt=True) == RENDERED


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    """transformers reads chat_template.jinja before tokenizer_config.json's key; import does the same."""
    from tidar_jax.hf.load import read_hf_config
    from tidar_jax.hf.serving import read_source_record

    other = "{{ messages[0]['content'] }}"
    src = make_source(tmp_path / "src", template=CHATML, template_file=other)
    record = read_source_record(src, read_hf_config(src))
    assert record["chat_template"] == other


def _one_line_error(argv, match, tmp_path, keep):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and match in message, message
    assert sorted(os.listdir(tmp_path)) == sorted(keep)  # nothing written, no temp dir


def test_a_template_that_does_not_parse_is_refused_on_import(tmp_path):
    src = make_source(tmp_path / "src", template=BAD_TEMPLATE)
    _one_line_error(["import-hf", src, str(tmp_path / "ckpt")], "the chat template does not parse as Jinja",
                    tmp_path, ["src"])


def test_bad_generation_config_is_refused_on_import(tmp_path):
    src = make_source(tmp_path / "src", generation={**GENERATION, "eos_token_id": ["<|im_end|>"]})
    _one_line_error(["import-hf", src, str(tmp_path / "ckpt")],
                    "generation_config.json: eos_token_id=['<|im_end|>']: expected a token id", tmp_path, ["src"])


def test_server_export_needs_a_generation_config(tmp_path, capsys):
    """A source without generation_config.json: the plain export works (transformers' defaults), the server
    export is refused with one line until one is given; a given template that does not parse is refused too."""
    src = make_source(tmp_path / "src", generation=None)
    ckpt = str(tmp_path / "ckpt")
    assert main(["import-hf", src, ckpt, "--block-size", "16"]) == 0
    _one_line_error(["export-hf", ckpt, str(tmp_path / "out"), "--for", "sglang-tidar"],
                    "carries no generation_config.json from its source model", tmp_path, ["src", "ckpt"])
    bad = tmp_path / "bad.jinja"
    bad.write_text(BAD_TEMPLATE)
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps(GENERATION))
    _one_line_error(["export-hf", ckpt, str(tmp_path / "out"), "--for", "sglang-tidar", "--generation-config",
                     str(gen), "--chat-template", str(bad)], f"{bad}: the chat template does not parse as Jinja",
                    tmp_path, ["src", "ckpt", "bad.jinja", "gen.json"])
    _one_line_error(["export-hf", ckpt, str(tmp_path / "out"), "--generation-config", str(tmp_path / "none.json")],
                    "--generation-config", tmp_path, ["src", "ckpt", "bad.jinja", "gen.json"])
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert main(["export-hf", ckpt, out, "--for", "sglang-tidar", "--generation-config", str(gen)]) == 0
    notice = capsys.readouterr().out
    assert "--speculative-tidar-b 16 (config.json" in notice and "wrongly" not in notice  # 16: the default
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(out).temperature == 0.6


def _init_source_and_preset(train_corpus, tmp_path):
    """An HF dir on the training corpus's tokenizer with a generation config, a chat template and a context length,
    and a TiDAR preset initialised from it."""
    import yaml

    from tidar_jax.hf import export_hf

    from test_recipe import _base

    manifest = json.load(open(os.path.join(train_corpus, "manifest.json")))
    vocab = manifest["vocab_size"]
    cfg = small_config("llama", vocab_size=vocab, mask_token_id=vocab - 1, block_size=None, hidden_size=32,
                       num_layers=1, num_heads=4, num_kv_heads=2, mlp_size=64)
    src = export_hf(cfg, random_state(cfg, 1), str(tmp_path / "src"),
                    tokenizer_path=os.path.join(train_corpus, "tokenizer.json"), max_position_embeddings=CONTEXT)
    generation = {"temperature": 0.6, "top_p": 0.95, "eos_token_id": [vocab - 2]}
    _write_json(os.path.join(src, "generation_config.json"), generation)
    tc_path = os.path.join(src, "tokenizer_config.json")
    _write_json(tc_path, {**json.load(open(tc_path)), "chat_template": CHATML})
    values = _base(train_corpus)
    values.pop("phases", None)
    values["model"] = {"init_from": src, "block_size": BLOCK}
    values["train"].update(objective="tidar", steps=2)
    values["data"]["eval_batches"] = 0
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(preset), generation, manifest["eos_token_id"]


def test_a_run_keeps_the_record_of_its_initialising_checkpoint(train_corpus, tmp_path):
    """The run dir of a TiDAR run initialised from an HF dir keeps that dir's serving record (what the run's
    export writes: the slow test below trains and exports)."""
    from tidar_jax.checkpoint import read_meta
    from tidar_jax.train.config import load_config
    from tidar_jax.train.loop import setup

    preset, generation, _ = _init_source_and_preset(train_corpus, tmp_path)
    run = setup(load_config(preset), str(tmp_path / "run"), show_progress=False)
    try:
        record = read_meta(run.run_dir).hf
    finally:
        run.ckpts.close()
        run.writer.close()
    assert record["generation_config"] == generation and record["chat_template"] == CHATML
    assert record["max_position_embeddings"] == CONTEXT


@pytest.mark.slow
def test_a_trained_run_exports_the_record_of_its_initialising_checkpoint(train_corpus, tmp_path, capsys):
    """TiDAR training (2 steps) from an HF dir, then the run's plain export: the source's generation settings, chat
    template and context length, with the data's end-of-document id added to the source's EOS ids."""
    import train as train_cli
    from tidar_jax.checkpoint import read_meta

    preset, generation, data_eos = _init_source_and_preset(train_corpus, tmp_path)
    run = str(tmp_path / "run")
    assert train_cli.main(["--no-phases", "--config", preset, "--run-dir", run]) == 0
    assert read_meta(run).hf["generation_config"] == generation

    out = str(tmp_path / "hf")
    assert main(["export-hf", run, out]) == 0
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["temperature"] == 0.6 and gen["eos_token_id"] == generation["eos_token_id"] + [data_eos]
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == CONTEXT
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["chat_template"] == CHATML
    assert f"trained block size {BLOCK}" in capsys.readouterr().out


def test_named_chat_templates_are_each_checked():
    """transformers' list form (named templates): each one parses, or the error names the one that does not."""
    from tidar_jax.hf.keys import HFFormatError
    from tidar_jax.hf.serving import check_chat_template

    check_chat_template([{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "{{ x }}"}], "t")
    with pytest.raises(HFFormatError, match=r"^t \('tool_use'\): the chat template does not parse as Jinja"):
        check_chat_template([{"name": "default", "template": CHATML}, {"name": "tool_use", "template": BAD_TEMPLATE}],
                            "t")
