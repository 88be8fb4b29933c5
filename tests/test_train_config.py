"""Training config: presets load, dotted overrides, one-line errors for unknown keys and bad values, CLI exits."""

import os
import subprocess
import sys

import pytest
import yaml

from tidar_jax.config import ConfigError
from tidar_jax.train.config import TrainConfig, dump_yaml, from_dict, load_config
from cli_output import user_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["tiny", "qwen2.5-1.5b-tidar", "qwen3-8b-tidar"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name):
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
    assert isinstance(cfg, TrainConfig)
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_paper_recipe_values():
    cfg = load_config(os.path.join(REPO, "configs", "qwen2.5-1.5b-tidar.yaml"))
    assert cfg.optim.name == "adam" and cfg.optim.schedule == "cosine"
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_frac) == (1e-5, 3e-6, 0.01)
    assert cfg.data.seq_len == 4096 and cfg.model.arch["block_size"] == 16
    assert cfg.data.seq_len * cfg.data.global_batch == 2 ** 21  # ~2M tokens per batch
    assert cfg.model.init_from and cfg.model.arch["dtype"] == "bfloat16"
    cfg8 = load_config(os.path.join(REPO, "configs", "qwen3-8b-tidar.yaml"))
    assert cfg8.model.remat and cfg8.model.arch["block_size"] == 16


def test_overrides_are_typed():
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      ["optim.lr=3e-4", "train.steps=7", "logging.progress=true", "model.hidden_size=64",
                       "optim.clip_norm=null", "model.init_from=/x/y"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.logging.progress is True
    assert cfg.model.arch["hidden_size"] == 64 and cfg.optim.clip_norm is None and cfg.model.init_from == "/x/y"
    assert cfg.replace(**{"optim.lr": 1e-2}).optim.lr == 1e-2


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("optim.lr=abc", "optim.lr='abc': must be a number"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("train.steps=1.5", "train.steps=1.5: must be an integer"),
    ("train.objective=mdm", "train.objective='mdm'"),
    ("optim.grad_accum=3", "must divide data.global_batch=8"),
    ("mesh.data=0", "mesh"),
    ("model.hidden_size=102", "model.num_heads=4: must divide hidden_size=102"),
    ("data.seq_len=130", "data.seq_len=130: must be a multiple of model.block_size=4"),
    ("model.num_layerz=2", "model.num_layerz"),
    ("lr", "expected section.key=value"),
])
def test_bad_values_give_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_unknown_yaml_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_bad_override_exits_nonzero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config",
                        os.path.join(REPO, "configs", "tiny.yaml"), "--run-dir", str(tmp_path / "r"), "optim.lr=x"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode != 0
    assert user_lines(r.stderr) == ["error: optim.lr='x': must be a number"]
    assert not (tmp_path / "r").exists()


def test_cli_print_config_applies_steps_flag():
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config",
                        os.path.join(REPO, "configs", "tiny.yaml"), "--run-dir", "unused", "--steps", "5",
                        "--print-config"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))  # one per phase of the recipe: --steps sets the last (TiDAR) one's
    assert [d["train"]["objective"] for d in docs] == ["ar", "tidar"] and docs[-1]["train"]["steps"] == 5
