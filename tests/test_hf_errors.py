"""Bad HF directories and bad export requests: one clear line each, a non-zero exit from the CLI, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_hf_support import MASK_ID, hf_model, save_hf_dir
from tidar_jax.convert import main
from tidar_jax.hf import HFFormatError, export_hf, load_hf_dir
from cli_output import user_lines


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf_dir(hf_model("qwen2", False, seed=1, layers=1), tmp_path_factory.mktemp("good") / "hf")


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(good_dir, path)
    return path


def _edit_config(path, **changes):
    cfg = json.load(open(path / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(path / "config.json", "w"))


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _fails_cleanly(tmp_path, argv, expect):
    """The CLI exits with exactly one line containing ``expect``; nothing appears under tmp_path/out*."""
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("error: "), message
    assert expect in message, message
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp dir left
    return message


def _truncate(path):
    f = path / "model.safetensors"
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)


def _wrong_shape(path):
    _edit_config(path, intermediate_size=40)  # the stored MLP weights are 48 wide


def _missing_tensor(path):
    _rewrite_tensors(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))


def _extra_tensor(path):
    _rewrite_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", np.zeros(32, np.float32)))


def _bad_index(path):
    json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}},
              open(path / "model.safetensors.index.json", "w"))


def _no_weights(path):
    os.remove(path / "model.safetensors")


def _torch_only(path):
    os.rename(path / "model.safetensors", path / "pytorch_model.bin")


CASES = {
    "missing config": (lambda p: os.remove(p / "config.json"), "no config.json"),
    "config not json": (lambda p: open(p / "config.json", "w").write("{oops"), "not valid JSON"),
    "wrong architecture": (lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                           "unsupported architecture ['GPT2LMHeadModel']"),
    "truncated safetensors": (_truncate, "truncated safetensors file"),
    "mismatched shape": (_wrong_shape, "has shape (48, 32) but config.json implies (40, 32)"),
    "missing tensor": (_missing_tensor, "missing tensor(s) ['model.layers.0.mlp.up_proj.weight']"),
    "unexpected tensor": (_extra_tensor, "unexpected tensor(s) ['model.layers.0.self_attn.o_proj.bias']"),
    "index names missing file": (_bad_index, "model-00001-of-00002.safetensors"),
    "no weights": (_no_weights, "no model.safetensors or model.safetensors.index.json"),
    "pickle weights only": (_torch_only, "convert them to safetensors first"),
    "rope scaling": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
                     "rope_type='yarn' is not supported"),
    "sliding window": (lambda p: _edit_config(p, use_sliding_window=True), "use_sliding_window=true"),
    "bad head count": (lambda p: _edit_config(p, num_key_value_heads=3), "num_kv_heads=3"),
    "llama without mask token": (lambda p: _edit_config(p, architectures=["LlamaForCausalLM"], model_type="llama"),
                                 "no mask_token_id for this llama model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_hf_dir_one_line_nothing_written(bad_dir, tmp_path, case):
    corrupt, expect = CASES[case]
    corrupt(bad_dir)
    extra = [] if case == "llama without mask token" else ["--mask-token-id", str(MASK_ID)]
    _fails_cleanly(tmp_path, ["import-hf", str(bad_dir), str(tmp_path / "out"), *extra], expect)
    with pytest.raises(HFFormatError):  # the library raises the same typed error
        load_hf_dir(str(bad_dir), **({} if not extra else {"mask_token_id": MASK_ID}))


def test_missing_dir_and_existing_output(good_dir, tmp_path):
    _fails_cleanly(tmp_path, ["import-hf", str(tmp_path / "nope"), str(tmp_path / "out")], "not a directory")
    (tmp_path / "taken").mkdir()
    _fails_cleanly(tmp_path, ["import-hf", good_dir, str(tmp_path / "taken"), "--mask-token-id", "3"],
                   "already exists")
    _fails_cleanly(tmp_path, ["import-hf", good_dir, str(tmp_path / "out"), "--mask-token-id", "96"],
                   "mask_token_id=96")
    _fails_cleanly(tmp_path, ["export-hf", str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist")
    _fails_cleanly(tmp_path, ["export-hf", good_dir, str(tmp_path / "out"), "--max-shard-size", "lots"],
                   "--max-shard-size='lots'")


def test_export_failure_leaves_nothing(good_dir, tmp_path, monkeypatch):
    import safetensors.numpy

    bundle = load_hf_dir(good_dir, mask_token_id=MASK_ID)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(tensors, path, metadata=metadata)

    real_save = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        export_hf(bundle.config, bundle.params, str(tmp_path / "out"), max_shard_bytes=4000)
    assert len(calls) == 2 and os.listdir(tmp_path) == []  # neither out nor the temp dir remains

    with pytest.raises(HFFormatError, match="family 'llama' needs qkv_bias=False"):
        export_hf(bundle.config.replace(family="llama"), bundle.params, str(tmp_path / "out2"))
    with pytest.raises(HFFormatError, match=r"parameter embed has shape \(96, 32\), the config implies \(96, 64\)"):
        export_hf(bundle.config.replace(hidden_size=64, head_dim=16), bundle.params, str(tmp_path / "out3"))
    assert os.listdir(tmp_path) == []


def test_cli_process_exit_code_and_single_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tidar_jax.convert", "import-hf", str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0
    lines = user_lines(proc.stderr)
    assert lines == [f"error: {tmp_path / 'missing'}: not a directory"], proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")
