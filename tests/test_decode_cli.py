"""decode.py end to end on a saved params checkpoint with a tiny BPE tokenizer, and its bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from test_decode_support import random_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import decode  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "def add(a, b): return a + b", "héllo wörld"] * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tidar_jax.checkpoint.params import save_params

    tmp = tmp_path_factory.mktemp("decode_cli")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok_path = str(tmp / "tokenizer.json")
    tok.save(tok_path)
    model = random_tiny("float32", seed=3, vocab_size=320, mask_token_id=319)
    assert model.cfg.block_size == 4  # the trained block size the checkpoint records
    path = save_params(str(tmp / "ckpt"), model.cfg, nnx.state(model), tokenizer_path=tok_path)
    return path


def test_json_compare_greedy_is_identical(checkpoint, capsys):
    assert decode.main(["--checkpoint", checkpoint, "--prompt", "the cat", "--max-new-tokens", "12", "--json",
                        "--compare"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # exactly one JSON object
    obj = json.loads(out[0])
    assert obj["prompt"] == "the cat" and len(obj["tokens"]) == 12 and isinstance(obj["text"], str)
    assert obj["compare"]["identical"] is True  # beta=1, slot0=verifier, greedy: lossless
    for key in ("nfe", "tokens_per_nfe", "accepted_length_hist", "wall_s", "tokens_per_s"):
        assert key in obj["stats"]
    assert obj["compare"]["speedup"] > 0


def test_streaming_colours_chunks_and_prints_stats(checkpoint, capsys, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("héllo wörld", encoding="utf-8")
    assert decode.main(["--checkpoint", checkpoint, "--prompt-file", str(prompt_file), "--max-new-tokens", "10",
                        "--color", "always", "--block-size", "4"]) == 0
    captured = capsys.readouterr()
    assert decode.COLOURS[0] in captured.out and decode.RESET in captured.out
    assert "T/NFE" in captured.err and "NFE" in captured.err


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "x", "--block-size", "8"], "trained with block size 4"),
    (["--prompt", "the cat " * 40, "--max-cache-len", "64"], "too long"),
    (["--prompt", "x", "--beta", "2"], "beta=2.0"),
    (["--prompt", "x", "--mode", "fast"], "--mode='fast'"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
])
def test_bad_input_one_line(checkpoint, argv, needle):
    with pytest.raises(SystemExit) as e:
        decode.main(["--checkpoint", checkpoint] + argv)
    assert needle in str(e.value.code) and "\n" not in str(e.value.code)


def test_non_utf8_prompt_file(checkpoint, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(SystemExit) as e:
        decode.main(["--checkpoint", checkpoint, "--prompt-file", str(bad)])
    assert "not valid UTF-8" in str(e.value.code)


def test_missing_checkpoint_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), "--checkpoint",
                           str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_size_flags(checkpoint, capsys, tmp_path):
    """--recommendation (block size + groups), --head, --dtype, --eos-token-id list, --stop-ids, --mesh."""
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"recommendation": {"best_block_size": 4, "best_groups": [1, 2], "head": "one_pass"}}))
    assert decode.main(["--checkpoint", checkpoint, "--prompt", "the cat", "--max-new-tokens", "12", "--json",
                        "--compare", "--recommendation", str(rec), "--dtype", "float32", "--eos-token-id", "-1",
                        "--stop-ids", "1,2,3", "--mesh", "data=1,fsdp=1,tensor=8"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert obj["stats"]["groups"] == [1, 2] and obj["stats"]["head"] == "one_pass"
    assert obj["stats"]["block_size"] == 4 and obj["compare"]["identical"] is True


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "x", "--mesh", "data=3"], "--mesh='data=3'"),
    (["--prompt", "x", "--mesh", "rows=2"], "--mesh='rows=2'"),
    (["--prompt", "x", "--groups", "9"], "groups=9"),
    (["--prompt", "x", "--eos-token-id", "1,x"], "--eos-token-id"),
    (["--prompt", "x", "--recommendation", "/nonexistent.json"], "--recommendation"),
])
def test_real_size_bad_input(checkpoint, argv, needle):
    with pytest.raises(SystemExit) as e:
        decode.main(["--checkpoint", checkpoint] + argv)
    assert needle in str(e.value.code) and "\n" not in str(e.value.code)
